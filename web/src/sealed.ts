// Sealed requests from the browser (teeshard.attest.sealing, v2): the body, the
// API key, a timestamp and a random request id HPKE-sealed to the entry node's
// attested X25519 key, so an ingress outside the TEE sees ciphertext only; the
// answer comes back as sealed records keyed by a secret only this page and the
// attested node know (teeshard.attest.sealed_stream).

import { type Bytes, concat, lp, randomBytes, sha256, u64, utf8 } from "./bytes";
import { hpkeSeal } from "./hpke";

export const SEALED_PATH = "/v1/sealed";
export const SEALED_CONTENT_TYPE = "application/teeshard-sealed";
const REQUEST_INFO = utf8("teeshard/sealed-request/v2\0");
const RESPONSE_INFO = utf8("teeshard/sealed-response/v2\0");
const FINAL = 0x01;
const MIN_RECORD = 256 + 16;
const MAX_RECORD = 65536 + 16;

export interface Sealed {
  sealed: Bytes;
  reader: ResponseReader;
}

/** Seal `body` for `path` to the node whose certificate SHA-256 is `fingerprint`. */
export async function sealRequest(
  fingerprint: Bytes,
  sealingKey: Bytes,
  path: string,
  body: Bytes,
  apiKey: string,
): Promise<Sealed> {
  const secret = randomBytes(32);
  const plaintext = concat(
    u64(Math.floor(Date.now() / 1000)),
    lp(randomBytes(16)),
    lp(secret),
    lp(utf8(apiKey)),
    lp(utf8(path)),
    lp(body),
  );
  const sealed = await hpkeSeal(sealingKey, concat(REQUEST_INFO, lp(fingerprint)), plaintext);
  return { sealed, reader: await ResponseReader.create(secret, await sha256(sealed)) };
}

export class SealedStreamError extends Error {}

/** Opens the sealed answer record by record; the head gives the inner status. */
export class ResponseReader {
  status: number | null = null;
  contentType: string | null = null;
  finished = false;
  private index = 0;
  private buffer: Bytes = new Uint8Array(0);

  private constructor(
    private readonly key: CryptoKey,
    private readonly base: Bytes,
  ) {}

  static async create(secret: Bytes, requestDigest: Bytes): Promise<ResponseReader> {
    const ikm = await crypto.subtle.importKey("raw", secret, "HKDF", false, ["deriveBits"]);
    const material = new Uint8Array(
      await crypto.subtle.deriveBits(
        { name: "HKDF", hash: "SHA-256", salt: requestDigest, info: RESPONSE_INFO },
        ikm,
        28 * 8,
      ),
    );
    const key = await crypto.subtle.importKey("raw", material.slice(0, 16), "AES-GCM", false, [
      "decrypt",
    ]);
    return new ResponseReader(key, material.slice(16));
  }

  /** Open every whole record received so far; return the data of the data records. */
  async feed(chunk: Uint8Array): Promise<Bytes[]> {
    this.buffer = concat(this.buffer, chunk);
    const out: Bytes[] = [];
    while (this.buffer.length >= 4) {
      const size = new DataView(this.buffer.buffer, this.buffer.byteOffset).getUint32(0, false);
      if (size < MIN_RECORD || size > MAX_RECORD) {
        throw new SealedStreamError(`sealed record ${this.index} has an impossible length`);
      }
      if (this.buffer.length < 4 + size) break;
      const sealed = this.buffer.slice(4, 4 + size);
      this.buffer = this.buffer.slice(4 + size);
      const data = await this.open(sealed);
      if (data !== null) out.push(data);
    }
    return out;
  }

  private async open(sealed: Bytes): Promise<Bytes | null> {
    if (this.finished) throw new SealedStreamError("a sealed record arrived after the final one");
    const nonce = this.base.slice();
    let index = this.index;
    for (let i = 11; i >= 0 && index > 0; i--, index = Math.floor(index / 256)) {
      nonce[i] ^= index & 0xff;
    }
    let padded: Bytes;
    try {
      padded = new Uint8Array(
        await crypto.subtle.decrypt({ name: "AES-GCM", iv: nonce }, this.key, sealed),
      );
    } catch {
      throw new SealedStreamError(
        `sealed record ${this.index} does not open (tampered, reordered or lost)`,
      );
    }
    const view = new DataView(padded.buffer);
    const flags = padded[0];
    const size = view.getUint32(1, false);
    if (flags & ~FINAL || size > padded.length - 5 || padded.slice(5 + size).some((b) => b !== 0)) {
      throw new SealedStreamError(`sealed record ${this.index} is malformed`);
    }
    const data = padded.slice(5, 5 + size);
    const first = this.index === 0;
    this.index += 1;
    this.finished = (flags & FINAL) !== 0;
    if (first) {
      const head = new DataView(data.buffer);
      this.status = head.getUint32(0, false);
      const length = head.getUint32(4, false);
      this.contentType = new TextDecoder().decode(data.slice(8, 8 + length));
      return null;
    }
    return data;
  }
}

/** The opened data of a sealed answer, as it arrives; checks it was not cut short. */
export async function* openedBody(response: Response, reader: ResponseReader): AsyncGenerator<Bytes> {
  if (response.body === null) throw new SealedStreamError("the sealed answer has no body");
  const stream = response.body.getReader();
  for (;;) {
    const { value, done } = await stream.read();
    if (done) break;
    for (const data of await reader.feed(value)) yield data;
  }
  if (!reader.finished) throw new SealedStreamError("the sealed answer was cut short");
}
