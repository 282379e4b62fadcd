// The network page: models, the chain's stages as the entry node re-verified them,
// hop health and load, the replicas of every layer range with their attestation,
// health and measured load (a routed network), the nodes registered in the pool.
// Refreshed every 5 s.

import type { JSX } from "preact";
import { useEffect, useState } from "preact/hooks";
import { type Network, type NetworkNodeState, type Registry, errorText, getJson } from "./api";
import { short } from "./bytes";

export function NetworkPage(): JSX.Element {
  const [network, setNetwork] = useState<Network | null>(null);
  const [registry, setRegistry] = useState<Registry | null>(null);
  const [error, setError] = useState("");
  useEffect(() => {
    let stopped = false;
    const load = () =>
      Promise.all([getJson<Network>("/v1/console/network"), getJson<Registry>("/v1/network")]).then(
        ([n, r]) => {
          if (!stopped) {
            setNetwork(n);
            setRegistry(r);
            setError("");
          }
        },
        (e: unknown) => !stopped && setError(errorText(e)),
      );
    void load();
    const timer = setInterval(() => void load(), 5000);
    return () => {
      stopped = true;
      clearInterval(timer);
    };
  }, []);
  return (
    <div class="page">
      <h1>Network</h1>
      {error && (
        <p class="error" role="alert">
          {error}
        </p>
      )}
      {network && (
        <>
          <section class="card" aria-labelledby="models-heading">
            <h2 id="models-heading">Models served</h2>
            <ul>
              {network.models.map((m) => (
                <li key={m.id}>
                  <code>{m.id}</code>: {network.num_layers} layers over {network.stages.length}{" "}
                  stage(s){" "}
                  {network.covers_all_layers ? (
                    <span class="badge good">every layer attested</span>
                  ) : (
                    <span class="badge failed">chain incomplete or unverified</span>
                  )}
                </li>
              ))}
            </ul>
            <p class="small">
              Entry node: {network.entry.sessions.open} of {network.entry.sessions.max_sessions}{" "}
              sessions open, {network.entry.sessions.reserved_tokens} cache tokens reserved. Next
              hop {network.next ? <code>{network.next.url}</code> : "none"}
              {network.next &&
                ` ${network.next.connected ? "connected" : "not connected"}, ${network.next.in_flight} in flight`}
              .
            </p>
          </section>
          <section class="card" aria-labelledby="chain-heading">
            <h2 id="chain-heading">The chain</h2>
            <div class="table-wrap">
              <table data-testid="stages">
                <thead>
                  <tr>
                    <th scope="col">stage</th>
                    <th scope="col">layers</th>
                    <th scope="col">provider</th>
                    <th scope="col">attestation</th>
                    <th scope="col">manifest</th>
                    <th scope="col">certificate</th>
                    <th scope="col">attested at</th>
                  </tr>
                </thead>
                <tbody>
                  {network.stages.map((s) => (
                    <tr key={s.stage} class={s.verified ? "ok" : "bad"}>
                      <td>{s.stage}</td>
                      <td>[{s.layers.replace(":", ", ")})</td>
                      <td>
                        {s.provider} ({s.tee_type})
                        {s.insecure && <span class="badge insecure">INSECURE</span>}
                      </td>
                      <td>
                        {s.verified ? (
                          <span class="badge good">✓ verified{s.fresh ? ", fresh" : ""}</span>
                        ) : (
                          <span class="badge failed" title={s.problem ?? ""}>
                            ✗ {s.problem}
                          </span>
                        )}
                        {s.tcb_status && <span class="small"> TCB {s.tcb_status}</span>}
                      </td>
                      <td>
                        <code title={s.manifest_hash}>{short(s.manifest_hash)}</code>
                      </td>
                      <td>
                        <code title={s.certificate_sha256}>{short(s.certificate_sha256)}</code>
                      </td>
                      <td>{new Date(s.signed_at * 1000).toLocaleTimeString()}</td>
                    </tr>
                  ))}
                </tbody>
              </table>
            </div>
            <p class="small">
              Re-verified by the entry node against its policy on every refresh: stage 0 with a
              fresh nonce, later stages as their upstream node last attested them.
            </p>
          </section>
          {registry?.routing === "registry" && <Replicas registry={registry} />}
          {network.registered.length > 0 && (
            <section class="card" aria-labelledby="registered-heading">
              <h2 id="registered-heading">Registered nodes</h2>
              <ul>
                {network.registered.map((n) => (
                  <li key={n.node_id}>
                    <code>{n.node_id}</code> layers {n.layers} ·{" "}
                    {n.admitted ? "admitted" : "awaiting admission"} · {n.served_total} tokens served
                  </li>
                ))}
              </ul>
            </section>
          )}
        </>
      )}
    </div>
  );
}

function nodeState(node: NetworkNodeState): JSX.Element {
  if (node.attestation !== "verified") {
    return (
      <span class="badge failed" title={node.problem ?? ""}>
        ✗ attestation {node.attestation}
      </span>
    );
  }
  if (!node.healthy) {
    return (
      <span class="badge failed" title={node.problem ?? ""}>
        ✗ unreachable
      </span>
    );
  }
  if (node.banned_for_s > 0) {
    return (
      <span class="badge failed" title={node.ban_reason ?? ""}>
        banned {Math.round(node.banned_for_s)} s
      </span>
    );
  }
  return <span class="badge good">✓ usable</span>;
}

function loadText(node: NetworkNodeState): string {
  const load = node.load;
  const mine = `${node.sessions} of this entry's sessions`;
  if (load === null) return `${mine}; step load not readable`;
  const step = load.step_ms === null ? "step time not measured yet" : `${load.step_ms} ms a step`;
  return `${mine}; ${load.sessions} sessions, ${load.in_flight} steps in flight; ${step}`;
}

/** The layer ranges after the entry's, each with its replicas: state and measured load. */
function Replicas({ registry }: { registry: Registry }): JSX.Element {
  const ranges = (registry.ranges ?? []).map((r) => (typeof r === "string" ? r : r.layers));
  const counters = registry.counters;
  return (
    <section class="card" aria-labelledby="replicas-heading">
      <h2 id="replicas-heading">Replicas</h2>
      {!registry.detail ? (
        <ul data-testid="replica-counts">
          {(registry.ranges ?? []).map((r) =>
            typeof r === "string" ? null : (
              <li key={r.layers}>
                layers [{r.layers.replace(":", ", ")}): {r.usable_nodes} usable node(s)
              </li>
            ),
          )}
        </ul>
      ) : (
        <div class="table-wrap">
          <table data-testid="replicas">
            <thead>
              <tr>
                <th scope="col">layers</th>
                <th scope="col">node</th>
                <th scope="col">state</th>
                <th scope="col">load</th>
              </tr>
            </thead>
            <tbody>
              {ranges.flatMap((range) =>
                (registry.nodes ?? [])
                  .filter((n) => n.layers === range)
                  .map((n) => (
                    <tr key={n.url} class={n.usable ? "ok" : "bad"} data-layers={range}>
                      <td data-label="layers">[{range.replace(":", ", ")})</td>
                      <td data-label="node">
                        <code>{n.url}</code>
                      </td>
                      <td data-label="state">{nodeState(n)}</td>
                      <td data-label="load">{loadText(n)}</td>
                    </tr>
                  )),
              )}
            </tbody>
          </table>
        </div>
      )}
      {counters && (
        <p class="small">
          {counters.failovers} failover(s), {counters.retries} route retries,{" "}
          {Object.values(counters.bans).reduce((a, b) => a + b, 0)} ban(s) since start.
          {registry.routes && ` ${registry.routes.length} route(s) in use now.`}
        </p>
      )}
    </section>
  );
}
