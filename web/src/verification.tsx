// Under each answer: every stage of its receipt chain, and what this browser checked.

import type { JSX } from "preact";
import { short } from "./bytes";
import type { SegmentReport } from "./segments";
import type { ChainReport, StageReport } from "./verify";

function StageRow({ stage }: { stage: StageReport }): JSX.Element {
  const failed = stage.checks.filter((c) => !c.ok);
  return (
    <tr class={stage.ok ? "ok" : "bad"} data-stage={stage.stage}>
      <td data-label="stage">{stage.stage}</td>
      <td data-label="node">{stage.nodeId || "—"}</td>
      <td data-label="layers">[{stage.layers.replace(":", ", ")})</td>
      <td data-label="provider">
        {stage.provider}
        {stage.insecure && (
          <span class="badge insecure" title="simulated evidence: no TEE proves anything here">
            INSECURE
          </span>
        )}
      </td>
      <td data-label="manifest">
        <code title={stage.manifestHash}>{short(stage.manifestHash)}</code>
      </td>
      <td data-label="certificate">
        <code title={stage.fingerprint}>{short(stage.fingerprint)}</code>
      </td>
      <td data-label="receipt" class="verdict">
        {stage.ok ? (
          <span class="badge good">✓ verified</span>
        ) : (
          <span class="badge failed" title={failed.map((c) => c.name).join("; ")}>
            ✗ FAILED
          </span>
        )}
        {!stage.ok && (
          <ul class="failures">
            {failed.map((c) => (
              <li key={c.name}>
                {c.name}
                {c.detail ? `: ${c.detail}` : ""}
              </li>
            ))}
          </ul>
        )}
      </td>
    </tr>
  );
}

function SegmentsTable({ segments }: { segments: SegmentReport[] }): JSX.Element {
  return (
    <div class="table-wrap">
      <table data-testid="segments">
        <caption>
          Route segments: this answer failed over, {segments.length} routes produced it
        </caption>
        <thead>
          <tr>
            <th scope="col">segment</th>
            <th scope="col">tokens</th>
            <th scope="col">stages signed</th>
            <th scope="col">positions</th>
            <th scope="col">receipts</th>
          </tr>
        </thead>
        <tbody>
          {segments.map((s) => (
            <tr key={s.index} class={s.ok ? "ok" : "bad"} data-segment={s.index}>
              <td data-label="segment">{s.index}</td>
              <td data-label="tokens">
                [{s.tokens[0]}, {s.tokens[1]})
              </td>
              <td data-label="stages signed">{s.stages}</td>
              <td data-label="positions">{s.positions}</td>
              <td data-label="receipts" class="verdict">
                {!s.ok ? (
                  <span class="badge failed" title={s.problems.join("; ")}>
                    ✗ FAILED
                  </span>
                ) : s.complete ? (
                  <span class="badge good">✓ verified</span>
                ) : (
                  <span class="badge partial" title="a lost node could not sign: proves no tokens">
                    ✓ partial: a node was lost
                  </span>
                )}
                {!s.ok && (
                  <ul class="failures">
                    {s.problems.map((p) => (
                      <li key={p}>{p}</li>
                    ))}
                  </ul>
                )}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}

export function VerificationPanel({ report }: { report: ChainReport }): JSX.Element {
  const summary = report.ok
    ? `Verified in this browser: ${report.stages.length} stage(s) signed this answer`
    : "Verification FAILED: this answer's receipts do not check out";
  return (
    <details class={`verification ${report.ok ? "ok" : "bad"}`} open={!report.ok}>
      <summary>
        <span class={`badge ${report.ok ? "good" : "failed"}`} data-testid="verdict">
          {report.ok ? "✓ verified" : "✗ FAILED"}
        </span>{" "}
        {summary}
      </summary>
      {report.problems.length > 0 && (
        <ul class="failures">
          {report.problems.map((p) => (
            <li key={p}>{p}</li>
          ))}
        </ul>
      )}
      <div class="table-wrap">
        <table>
          <caption class="visually-hidden">Receipt chain of this answer</caption>
          <thead>
            <tr>
              <th scope="col">stage</th>
              <th scope="col">node</th>
              <th scope="col">layers</th>
              <th scope="col">provider</th>
              <th scope="col">manifest</th>
              <th scope="col">certificate</th>
              <th scope="col">receipt</th>
            </tr>
          </thead>
          <tbody>
            {report.stages.map((s) => (
              <StageRow key={s.stage} stage={s} />
            ))}
          </tbody>
        </table>
      </div>
      {report.segments && report.segments.length > 0 && (
        <SegmentsTable segments={report.segments} />
      )}
      {report.sealed && (
        <p class="small" data-testid="sealed-note">
          Sent sealed: HPKE to stage 0's attested sealing key (checked against its bundle first);
          the answer came back in sealed records only this page could open.
        </p>
      )}
      <p class="small">
        Checked with WebCrypto: each receipt's ECDSA P-256 signature by its stage's attested key
        (from <code>/v1/attestation/chain</code> with a fresh nonce), the links between receipts,
        the attested manifest and layers, that stage 0 received the SHA-256 of the exact body
        this browser sent, and that the last stage sent exactly this answer's token ids. Receipt chain digest <code>{short(report.digest, 16)}</code>.
      </p>
    </details>
  );
}
