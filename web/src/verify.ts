// Checking an answer's receipt chain in the browser, with WebCrypto only.
//
// For every stage bundle of /v1/attestation/chain: the certificate's SHA-256
// (the fingerprint receipts name), its P-256 key, the signature over the nonce
// (stage 0 answers ours, so it is fresh), and the report_data binding of key,
// manifest and sealing key (SHA-512, as the quote commits to it). For every
// receipt: the ECDSA P-256 / SHA-256 signature by the attested key of its stage,
// the link to the previous receipt's hash, manifest and layers equal to what
// that key's bundle attests, contiguous layers from 0 to the model's last, each
// stage received what the stage before it sent, and stage 0 received exactly
// the SHA-256 of the body this browser sent. The quote itself (DCAP) is checked
// by the entry node's verifier, not here: the network page shows that result.

import type { SegmentReport } from "./segments";
import {
  type Bytes,
  certificateSpki,
  concat,
  derSignatureToRaw,
  equal,
  fromHex,
  lp,
  pemToDer,
  sha256,
  sha512,
  toHex,
  u32,
  u64,
  utf8,
} from "./bytes";

export interface ReceiptJson {
  request_id: string;
  stage: number;
  layers: string;
  model_layers: number; // the model's layer count the signer's manifest states (0: none)
  positions: number; // token positions the stage ran for the request
  manifest_hash: string;
  received_sha256: string;
  sent_sha256: string;
  previous_hash: string;
  signer: string;
  signature: string;
}

export interface BundleJson {
  evidence: { provider: string; tee_type: string; report_data: string; insecure: boolean };
  manifest: { model: string; layers: string; combined_hash: string; arch: Record<string, unknown> };
  certificate: string;
  sealing_public_key: string;
  nonce: string;
  signed_at: number;
  nonce_signature: string;
}

export interface Check {
  name: string;
  ok: boolean;
  detail?: string;
}

export interface StageReport {
  stage: number;
  nodeId: string;
  layers: string;
  provider: string;
  teeType: string;
  insecure: boolean;
  manifestHash: string;
  fingerprint: string;
  checks: Check[];
  ok: boolean;
}

export interface ChainReport {
  ok: boolean;
  stages: StageReport[];
  problems: string[]; // what failed outside any one stage
  digest: string;
  sealed?: boolean; // the request went HPKE-sealed to stage 0's attested key
  segments?: SegmentReport[]; // after a failover: every route's part of the answer
}

/** What the response says about itself (its id, and the `teeshard` extension field). */
export interface AnswerClaims {
  servedBy?: string[];
  responseId?: string;
  requestId?: string; // teeshard.request_id
  tokenIds?: number[]; // teeshard.completion_token_ids
}

interface Signer {
  bundle: BundleJson;
  key: CryptoKey;
  fingerprint: string;
  checks: Check[];
}

const RECEIPT_DOMAIN = utf8("teeshard/receipt/v2\0");
const NONCE_DOMAIN = utf8("teeshard/nonce-signature/v1\0");
const REPORT_DATA_DOMAIN = utf8("teeshard/report-data/v1\0");
const CHAIN_DOMAIN = utf8("teeshard/receipt-chain/v1\0");
const TRAFFIC_DOMAIN = utf8("teeshard/traffic/v1\0");
const ZERO_HASH = new Uint8Array(32);

function parseLayers(text: string): [number, number] {
  const match = /^(\d+):(\d+)$/.exec(text);
  if (!match) throw new Error(`bad layer range ${JSON.stringify(text)}`);
  return [Number(match[1]), Number(match[2])];
}

export function receiptSignedBytes(r: ReceiptJson): Bytes {
  const [start, end] = parseLayers(r.layers);
  return concat(
    RECEIPT_DOMAIN,
    lp(utf8(r.request_id)),
    u32(r.stage),
    u32(start),
    u32(end),
    u32(r.model_layers),
    u32(r.positions),
    lp(fromHex(r.manifest_hash)),
    lp(fromHex(r.received_sha256)),
    lp(fromHex(r.sent_sha256)),
    lp(fromHex(r.previous_hash)),
    lp(fromHex(r.signer)),
  );
}

async function verifyEcdsa(key: CryptoKey, derSignature: Bytes, message: Bytes): Promise<boolean> {
  let raw: Bytes;
  try {
    raw = derSignatureToRaw(derSignature);
  } catch {
    return false;
  }
  return crypto.subtle.verify({ name: "ECDSA", hash: "SHA-256" }, key, raw, message);
}

/** Import one stage's attested key and check what its bundle claims about it. */
export async function checkBundle(bundle: BundleJson, ourNonce: Bytes | null): Promise<Signer> {
  const der = pemToDer(bundle.certificate);
  const spki = certificateSpki(der);
  const key = await crypto.subtle.importKey(
    "spki",
    spki,
    { name: "ECDSA", namedCurve: "P-256" },
    false,
    ["verify"],
  );
  const manifestHash = fromHex(bundle.manifest.combined_hash);
  const nonce = fromHex(bundle.nonce);
  const checks: Check[] = [];
  const nonceMessage = concat(NONCE_DOMAIN, lp(nonce), u64(bundle.signed_at), lp(manifestHash));
  const nonceOk = await verifyEcdsa(key, fromHex(bundle.nonce_signature), nonceMessage);
  checks.push({ name: "key signs the attestation nonce", ok: nonceOk });
  if (ourNonce !== null) {
    checks.push({ name: "fresh: answers this browser's nonce", ok: equal(nonce, ourNonce) });
  }
  const reportData = await sha512(
    concat(
      REPORT_DATA_DOMAIN,
      lp(spki),
      lp(manifestHash),
      lp(fromHex(bundle.sealing_public_key)),
    ),
  );
  checks.push({
    name: "quote's report_data binds key and manifest",
    ok: equal(reportData, fromHex(bundle.evidence.report_data)),
  });
  return { bundle, key, fingerprint: toHex(await sha256(der)), checks };
}

/**
 * Verify `receipts` against the stage `bundles` and the exact request `body` sent.
 * `nonce` is the one this browser sent for the chain (stage 0's bundle answers it).
 */
export async function verifyChain(
  receipts: ReceiptJson[],
  bundles: BundleJson[],
  body: Bytes,
  nonce: Bytes,
  claims: AnswerClaims = {},
): Promise<ChainReport> {
  const servedBy = claims.servedBy ?? [];
  const problems: string[] = [];
  const signers = new Map<string, Signer>();
  for (const [index, bundle] of bundles.entries()) {
    try {
      const signer = await checkBundle(bundle, index === 0 ? nonce : null);
      signers.set(signer.fingerprint, signer);
    } catch (error) {
      problems.push(`attestation bundle ${index} is unreadable: ${String(error)}`);
    }
  }
  if (receipts.length === 0) problems.push("the answer carries no receipts");
  const bodyHash = await sha256(body);
  const stages: StageReport[] = [];
  let previousHash: Bytes = ZERO_HASH;
  let previous: ReceiptJson | null = null;
  let position = 0;
  const requestId = receipts[0]?.request_id;
  for (const [index, receipt] of receipts.entries()) {
    const checks: Check[] = [];
    const signer = signers.get(receipt.signer);
    let signed: Bytes | null = null;
    try {
      signed = receiptSignedBytes(receipt);
    } catch (error) {
      checks.push({ name: "receipt is well formed", ok: false, detail: String(error) });
    }
    checks.push({ name: `stage number is ${index}`, ok: receipt.stage === index });
    checks.push({ name: "same request id", ok: receipt.request_id === requestId });
    if (signer === undefined) {
      checks.push({ name: "signed by an attested key", ok: false, detail: "unknown certificate" });
    } else {
      checks.push(...signer.checks);
      let ok = false;
      if (signed !== null) {
        try {
          ok = await verifyEcdsa(signer.key, fromHex(receipt.signature), signed);
        } catch {
          ok = false;
        }
      }
      checks.push({ name: "signature by the stage's attested key", ok });
      const attestedLayers = Number(signer.bundle.manifest.arch["num_layers"] ?? 0);
      checks.push({
        name: "manifest and layers are the attested ones",
        ok:
          receipt.manifest_hash === signer.bundle.manifest.combined_hash &&
          receipt.layers === signer.bundle.manifest.layers &&
          receipt.model_layers === attestedLayers,
      });
    }
    checks.push({
      name: index === 0 ? "first stage links to nothing" : "links to the previous receipt",
      ok: safeEqualHex(receipt.previous_hash, previousHash),
    });
    let start = -1;
    let end = -1;
    try {
      [start, end] = parseLayers(receipt.layers);
    } catch {
      /* reported by the well-formed check */
    }
    checks.push({ name: `layers start at ${position}`, ok: start === position });
    if (previous === null) {
      checks.push({
        name: "received exactly the body this browser sent",
        ok: safeEqualHex(receipt.received_sha256, bodyHash),
      });
    } else {
      checks.push({
        name: `received what stage ${index - 1} sent`,
        ok: receipt.received_sha256 === previous.sent_sha256,
      });
      checks.push({
        name: `ran no more token positions than stage ${index - 1}`,
        ok: receipt.positions <= previous.positions,
      });
    }
    if (index === receipts.length - 1) {
      checks.push({
        name: "sent exactly this answer's token ids",
        ok:
          claims.tokenIds !== undefined &&
          safeEqualHex(receipt.sent_sha256, await tokenTrafficHash(claims.tokenIds)),
        detail: claims.tokenIds === undefined ? "the response carries no token ids" : undefined,
      });
    }
    const ok = checks.every((c) => c.ok);
    const bundle = signer?.bundle;
    stages.push({
      stage: index,
      nodeId: servedBy[index] ?? "",
      layers: receipt.layers,
      provider: bundle?.evidence.provider ?? "unknown",
      teeType: bundle?.evidence.tee_type ?? "unknown",
      insecure: bundle?.evidence.insecure ?? true,
      manifestHash: receipt.manifest_hash,
      fingerprint: receipt.signer,
      checks,
      ok,
    });
    previousHash = signed !== null ? await sha256(signed) : ZERO_HASH;
    previous = receipt;
    position = end;
  }
  const last = signers.get(previous?.signer ?? "");
  const numLayers = Number(last?.bundle.manifest.arch["num_layers"] ?? NaN);
  if (previous !== null && position !== numLayers) {
    problems.push(`the chain ends at layer ${position} of ${numLayers}: a stage is missing`);
  }
  if (claims.requestId !== undefined && claims.requestId !== requestId) {
    problems.push(`the response names request ${claims.requestId}, the receipts ${requestId}`);
  }
  if (claims.responseId !== undefined && requestId !== undefined) {
    if (!["chatcmpl-", "cmpl-"].some((p) => claims.responseId === p + requestId)) {
      problems.push(`response id ${claims.responseId} is not request ${requestId}`);
    }
  }
  const digest = await chainDigest(receipts);
  return { ok: problems.length === 0 && stages.every((s) => s.ok), stages, problems, digest };
}

function safeEqualHex(hex: string, bytes: Uint8Array): boolean {
  try {
    return equal(fromHex(hex), bytes);
  } catch {
    return false;
  }
}

/** The last stage's "sent" hash of a completion: one length-prefixed frame per token id. */
export async function tokenTrafficHash(tokenIds: number[]): Promise<Bytes> {
  const frames = tokenIds.map((id) => {
    const frame = new Uint8Array(4);
    new DataView(frame.buffer).setUint32(0, id, true); // struct.pack("<I", id)
    return concat(u64(4), frame);
  });
  return sha256(concat(TRAFFIC_DOMAIN, ...frames));
}

export async function chainDigest(receipts: ReceiptJson[]): Promise<string> {
  const hashes: Bytes[] = [];
  for (const r of receipts) {
    try {
      hashes.push(await sha256(receiptSignedBytes(r)));
    } catch {
      return "";
    }
  }
  return toHex(await sha256(concat(CHAIN_DOMAIN, ...hashes)));
}
