// HPKE (RFC 9180) base mode, single shot, in the browser with WebCrypto only:
// DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, the suite the entry node
// opens sealed requests with (teeshard.attest.sealing). Output: enc || ciphertext.

import { type Bytes, concat, randomBytes, utf8 } from "./bytes";

const KEM_ID = 0x0020;
const KDF_ID = 0x0001;
const AEAD_ID = 0x0001;
const HASH_LEN = 32;

function i2osp(value: number, length: number): Bytes {
  const out = new Uint8Array(length);
  for (let i = length - 1, v = value; i >= 0; i--, v = Math.floor(v / 256)) out[i] = v & 0xff;
  return out;
}

const KEM_SUITE = concat(utf8("KEM"), i2osp(KEM_ID, 2));
const HPKE_SUITE = concat(utf8("HPKE"), i2osp(KEM_ID, 2), i2osp(KDF_ID, 2), i2osp(AEAD_ID, 2));
const VERSION = utf8("HPKE-v1");

async function hmac(key: Bytes, data: Bytes): Promise<Bytes> {
  const k = await crypto.subtle.importKey("raw", key, { name: "HMAC", hash: "SHA-256" }, false, [
    "sign",
  ]);
  return new Uint8Array(await crypto.subtle.sign("HMAC", k, data));
}

async function extract(salt: Bytes, ikm: Bytes): Promise<Bytes> {
  return hmac(salt.length ? salt : new Uint8Array(HASH_LEN), ikm);
}

async function expand(prk: Bytes, info: Bytes, length: number): Promise<Bytes> {
  const blocks: Bytes[] = [];
  let previous: Bytes = new Uint8Array(0);
  for (let i = 1; blocks.length * HASH_LEN < length; i++) {
    previous = await hmac(prk, concat(previous, info, new Uint8Array([i])));
    blocks.push(previous);
  }
  return concat(...blocks).slice(0, length);
}

function labeledExtract(suite: Bytes, salt: Bytes, label: string, ikm: Bytes): Promise<Bytes> {
  return extract(salt, concat(VERSION, suite, utf8(label), ikm));
}

function labeledExpand(
  suite: Bytes,
  prk: Bytes,
  label: string,
  info: Bytes,
  length: number,
): Promise<Bytes> {
  return expand(prk, concat(i2osp(length, 2), VERSION, suite, utf8(label), info), length);
}

/** HPKE-seal `plaintext` to the X25519 public key `recipient` (32 raw bytes). */
export async function hpkeSeal(recipient: Bytes, info: Bytes, plaintext: Bytes): Promise<Bytes> {
  const pkR = await crypto.subtle.importKey("raw", recipient, { name: "X25519" }, true, []);
  const ephemeral = (await crypto.subtle.generateKey({ name: "X25519" }, true, [
    "deriveBits",
  ])) as CryptoKeyPair;
  const dh = new Uint8Array(
    await crypto.subtle.deriveBits({ name: "X25519", public: pkR }, ephemeral.privateKey, 256),
  );
  const enc = new Uint8Array(await crypto.subtle.exportKey("raw", ephemeral.publicKey));
  // Encap: shared_secret = ExtractAndExpand(dh, enc || pkR)
  const eaePrk = await labeledExtract(KEM_SUITE, new Uint8Array(0), "eae_prk", dh);
  const shared = await labeledExpand(KEM_SUITE, eaePrk, "shared_secret", concat(enc, recipient), 32);
  // KeySchedule, mode_base, no PSK
  const empty = new Uint8Array(0);
  const pskIdHash = await labeledExtract(HPKE_SUITE, empty, "psk_id_hash", empty);
  const infoHash = await labeledExtract(HPKE_SUITE, empty, "info_hash", info);
  const context = concat(new Uint8Array([0]), pskIdHash, infoHash);
  const secret = await labeledExtract(HPKE_SUITE, shared, "secret", empty);
  const key = await labeledExpand(HPKE_SUITE, secret, "key", context, 16);
  const nonce = await labeledExpand(HPKE_SUITE, secret, "base_nonce", context, 12);
  const aead = await crypto.subtle.importKey("raw", key, "AES-GCM", false, ["encrypt"]);
  const sealed = await crypto.subtle.encrypt({ name: "AES-GCM", iv: nonce }, aead, plaintext);
  return concat(enc, new Uint8Array(sealed));
}

export { randomBytes };
