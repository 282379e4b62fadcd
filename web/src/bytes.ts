// Byte helpers shared by the verifier: hex, the canonical encoding of teeshard's
// signed messages (domain || u32 / u64 / length-prefixed fields), hashes through
// WebCrypto, and just enough DER to find a certificate's public key and to turn
// an ECDSA DER signature into the raw r || s that WebCrypto verifies.

export type Bytes = Uint8Array<ArrayBuffer>;

const encoder = new TextEncoder();

export function utf8(text: string): Bytes {
  return encoder.encode(text) as Bytes;
}

export function fromHex(hex: string): Bytes {
  if (hex.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(hex)) {
    throw new Error("not a hex string");
  }
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return out;
}

export function toHex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function concat(...parts: Uint8Array[]): Bytes {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

export function u32(value: number): Bytes {
  const out = new Uint8Array(4);
  new DataView(out.buffer).setUint32(0, value, false);
  return out;
}

export function u64(value: number): Bytes {
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigUint64(0, BigInt(value), false);
  return out;
}

/** Length-prefixed bytes: u32(len) || data. */
export function lp(data: Uint8Array): Bytes {
  return concat(u32(data.length), data);
}

export function equal(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i] ^ b[i];
  return diff === 0;
}

export async function sha256(data: Bytes): Promise<Bytes> {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", data));
}

export async function sha512(data: Bytes): Promise<Bytes> {
  return new Uint8Array(await crypto.subtle.digest("SHA-512", data));
}

export function randomBytes(n: number): Bytes {
  return crypto.getRandomValues(new Uint8Array(n));
}

export function pemToDer(pem: string): Bytes {
  const body = pem
    .replace(/-----BEGIN [A-Z ]+-----/, "")
    .replace(/-----END [A-Z ]+-----/, "")
    .replace(/\s+/g, "");
  const binary = atob(body);
  const out = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) out[i] = binary.charCodeAt(i);
  return out;
}

interface Tlv {
  tag: number;
  start: number; // of the whole element
  contentStart: number;
  end: number; // one past the last content byte
}

function readTlv(der: Uint8Array, offset: number): Tlv {
  if (offset + 2 > der.length) throw new Error("truncated DER");
  const tag = der[offset];
  let length = der[offset + 1];
  let contentStart = offset + 2;
  if (length & 0x80) {
    const count = length & 0x7f;
    if (count === 0 || count > 4) throw new Error("unsupported DER length");
    length = 0;
    for (let i = 0; i < count; i++) length = length * 256 + der[contentStart + i];
    contentStart += count;
  }
  const end = contentStart + length;
  if (end > der.length) throw new Error("truncated DER");
  return { tag, start: offset, contentStart, end };
}

function children(der: Uint8Array, parent: Tlv): Tlv[] {
  const out: Tlv[] = [];
  for (let at = parent.contentStart; at < parent.end; ) {
    const child = readTlv(der, at);
    out.push(child);
    at = child.end;
  }
  return out;
}

/** The DER SubjectPublicKeyInfo of an X.509 certificate (DER). */
export function certificateSpki(cert: Bytes): Bytes {
  const top = readTlv(cert, 0);
  const [tbs] = children(cert, top);
  if (top.tag !== 0x30 || tbs === undefined || tbs.tag !== 0x30) {
    throw new Error("not an X.509 certificate");
  }
  const fields = children(cert, tbs);
  const first = fields[0]?.tag === 0xa0 ? 1 : 0; // [0] EXPLICIT version
  // serial, signature algorithm, issuer, validity, subject, subjectPublicKeyInfo
  const spki = fields[first + 5];
  if (spki === undefined || spki.tag !== 0x30) throw new Error("certificate has no public key");
  return cert.slice(spki.start, spki.end);
}

/** ECDSA DER signature (SEQUENCE of two INTEGERs) -> raw r || s of `size` bytes each. */
export function derSignatureToRaw(der: Uint8Array, size = 32): Bytes {
  const top = readTlv(der, 0);
  const parts = children(der, top);
  if (top.tag !== 0x30 || top.end !== der.length || parts.length !== 2) {
    throw new Error("not a DER ECDSA signature");
  }
  const out = new Uint8Array(2 * size);
  parts.forEach((part, i) => {
    if (part.tag !== 0x02) throw new Error("not a DER ECDSA signature");
    let value = der.slice(part.contentStart, part.end);
    while (value.length > size && value[0] === 0) value = value.slice(1);
    if (value.length > size) throw new Error("signature integer too long");
    out.set(value, i * size + size - value.length);
  });
  return out;
}

export function short(hex: string, n = 12): string {
  return hex.length > n ? `${hex.slice(0, n)}…` : hex;
}
