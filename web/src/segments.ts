// After a failover an answer comes from several routes: `receipt_segments` lists them in
// order, each with the completion tokens [start, end) it produced and its receipt chain.
// The rules are teeshard.attest.response's: the segments cover the tokens in order; every
// chain verifies and starts at layer 0; a chain that stops early (a lost node could not
// sign) proves no tokens; a complete one's last stage sent exactly its slice of the token
// ids, after running the prompt and every token before its end (its signed positions).

import type { Bytes } from "./bytes";
import {
  type AnswerClaims,
  type BundleJson,
  type ChainReport,
  type ReceiptJson,
  verifyChain,
} from "./verify";

export interface SegmentJson {
  tokens: [number, number];
  receipts: ReceiptJson[];
}

export interface SegmentReport {
  index: number;
  tokens: [number, number];
  stages: number; // receipts signed
  positions: number; // token positions its first stage signed for
  complete: boolean; // every layer signed: it proves its tokens
  ok: boolean;
  problems: string[];
}

const SENT_CHECK = "sent exactly this answer's token ids";
const MISSING = "a stage is missing";

function sameChain(a: ReceiptJson[], b: ReceiptJson[]): boolean {
  return a.length === b.length && a.every((r, i) => r.signature === b[i].signature);
}

/** Check every segment; `problems` are those of the segments as a whole. */
export async function verifySegments(
  segments: SegmentJson[],
  final: ReceiptJson[],
  bundles: BundleJson[],
  body: Bytes,
  nonce: Bytes,
  claims: AnswerClaims & { promptTokens?: number },
): Promise<{ reports: SegmentReport[]; problems: string[] }> {
  const ids = claims.tokenIds ?? [];
  const problems: string[] = [];
  const reports: SegmentReport[] = [];
  let position = 0;
  for (const [index, segment] of segments.entries()) {
    const [start, end] = segment.tokens;
    const own: string[] = [];
    if (start !== position || end < start) own.push("covers tokens out of order or with a gap");
    position = end;
    const chain: ChainReport = await verifyChain(segment.receipts, bundles, body, nonce, {
      requestId: claims.requestId,
      tokenIds: ids.slice(start, end),
    });
    const complete = !chain.problems.some((p) => p.includes(MISSING));
    const failed = chain.stages.flatMap((s) =>
      s.checks.filter((c) => !c.ok && (complete || c.name !== SENT_CHECK)).map((c) => c.name),
    );
    own.push(...failed, ...chain.problems.filter((p) => complete || !p.includes(MISSING)));
    const last = segment.receipts[segment.receipts.length - 1];
    if (complete && claims.promptTokens !== undefined && end > 0 && last !== undefined) {
      const ran = claims.promptTokens + end - 1;
      if (last.positions !== ran) own.push(`signed ${last.positions} token positions, not ${ran}`);
    }
    if (index === segments.length - 1 && !sameChain(segment.receipts, final)) {
      own.push("the last segment is not the answer's receipt chain");
    }
    if (segment.receipts.length === 0) own.push("carries no receipts");
    reports.push({
      index,
      tokens: [start, end],
      stages: segment.receipts.length,
      positions: segment.receipts[0]?.positions ?? 0,
      complete,
      ok: own.length === 0,
      problems: [...new Set(own)],
    });
  }
  if (position !== ids.length) {
    problems.push(`the segments cover ${position} of ${ids.length} completion tokens`);
  }
  return { reports, problems };
}
