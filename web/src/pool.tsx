// The contribution pool: register a node (the entry node verifies its attestation
// first and says what it found), admitted nodes with their work and payouts, withdraw.

import type { JSX } from "preact";
import { useEffect, useState } from "preact/hooks";
import {
  type Found,
  type Info,
  type PoolNode,
  errorText,
  getApiKey,
  getJson,
  postJson,
} from "./api";
import { short } from "./bytes";
import { connectWallet, sendLedgerTx } from "./wallet";

function FoundView({ found }: { found: Found }): JSX.Element {
  return (
    <dl class="found" data-testid="found">
      <dt>Node</dt>
      <dd>
        <code>{found.node_id}</code>
      </dd>
      <dt>Provider</dt>
      <dd>
        {found.provider}
        {found.insecure && <span class="badge insecure">INSECURE</span>}
      </dd>
      <dt>Slot</dt>
      <dd>
        {found.model} layers [{found.layers.replace(":", ", ")})
      </dd>
      <dt>Manifest</dt>
      <dd>
        <code title={found.manifest_hash}>{short(found.manifest_hash, 24)}</code>
      </dd>
      <dt>Checked</dt>
      <dd>
        <ul>
          {found.notes.map((n) => (
            <li key={n}>{n}</li>
          ))}
        </ul>
      </dd>
    </dl>
  );
}

export function PoolPage(): JSX.Element {
  const [info, setInfo] = useState<Info | null>(null);
  const [pool, setPool] = useState<{ pool: number; nodes: PoolNode[] } | null>(null);
  const [url, setUrl] = useState("");
  const [found, setFound] = useState<Found | null>(null);
  const [status, setStatus] = useState("");
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
  const [tick, setTick] = useState(0);

  useEffect(() => {
    getJson<Info>("/v1/console/info").then(setInfo, (e: unknown) => setError(errorText(e)));
  }, []);
  useEffect(() => {
    if (info && info.ledger !== "none") {
      getJson<{ pool: number; nodes: PoolNode[] }>("/v1/console/pool").then(setPool, (e: unknown) =>
        setError(errorText(e)),
      );
    }
  }, [info, tick]);

  async function run(action: () => Promise<void>): Promise<void> {
    setBusy(true);
    setError("");
    setStatus("");
    try {
      await action();
    } catch (e) {
      setError(errorText(e));
    } finally {
      setBusy(false);
      setTick((t) => t + 1);
    }
  }

  const inspect = () =>
    run(async () => {
      setFound(null);
      setFound(await postJson<Found>("/v1/console/pool/inspect", { url: url.trim() }, true));
    });

  const register = () =>
    run(async () => {
      if (!found) return;
      if (info?.ledger === "evm") {
        const wallet = await connectWallet();
        setStatus("Your wallet signs the registration…");
        await sendLedgerTx(wallet, {
          action: "register_node",
          node_id: found.node_id,
          url: found.url.replace(/\/+$/, ""),
          manifest_hash: found.manifest_hash,
          model: found.model,
          layers: found.layers,
        });
        const admitted = await postJson<Found>("/v1/console/pool/admit", { url: found.url }, true);
        setStatus(admitted.admitted ? `Registered and admitted ${found.node_id}.` : "Registered.");
      } else {
        const done = await postJson<Found>("/v1/console/pool/register", { url: found.url }, true);
        setStatus(done.admitted ? `Registered and admitted ${done.node_id}.` : "Registered.");
      }
    });

  const withdraw = () =>
    run(async () => {
      if (info?.ledger === "evm") {
        const wallet = await connectWallet();
        const account = await getJson<{ earnings: number }>("/v1/console/account", true);
        await sendLedgerTx(wallet, { action: "withdraw", amount: account.earnings });
        setStatus(`Withdrew ${account.earnings}.`);
      } else {
        const done = await postJson<{ withdrawn: number }>("/v1/console/pool/withdraw", {}, true);
        setStatus(`Withdrew ${done.withdrawn}.`);
      }
    });

  if (info?.ledger === "none") {
    return (
      <div class="page">
        <h1>Contribution pool</h1>
        <p class="card">This entry node has no ledger, so no pool.</p>
      </div>
    );
  }
  return (
    <div class="page">
      <h1>Contribution pool</h1>
      <form
        class="card"
        aria-labelledby="register-heading"
        onSubmit={(e) => {
          e.preventDefault();
          void inspect();
        }}
      >
        <h2 id="register-heading">Register a node you host</h2>
        <p class="small">
          The entry node fetches the node's attestation with a fresh nonce, verifies it against its
          policy and finds the shard slot its manifest fills. Checking and registering need your API key
          {info?.ledger === "evm" ? " and your wallet's signature." : "."}
        </p>
        <label for="node-url">Node URL</label>
        <div class="row">
          <input
            id="node-url"
            type="url"
            placeholder="https://node.example.org:8001"
            value={url}
            required
            onInput={(e) => setUrl((e.currentTarget as HTMLInputElement).value)}
          />
          <button type="submit" disabled={busy}>
            Check attestation
          </button>
        </div>
        {found && <FoundView found={found} />}
        {found && (
          <button type="button" disabled={busy || !getApiKey()} onClick={() => void register()}>
            Register {found.node_id}
          </button>
        )}
      </form>
      {error && (
        <p class="error" role="alert">
          {error}
        </p>
      )}
      {status && (
        <p class="notice" role="status" data-testid="pool-status">
          {status}
        </p>
      )}
      {pool && (
        <section class="card" aria-labelledby="nodes-heading">
          <h2 id="nodes-heading">Nodes in the pool</h2>
          <p>
            Pool to distribute: <strong data-testid="pool-total">{pool.pool}</strong> tokens,
            shared by the work each admitted node served.
          </p>
          <div class="table-wrap">
            <table data-testid="pool-nodes">
              <thead>
                <tr>
                  <th scope="col">node</th>
                  <th scope="col">operator</th>
                  <th scope="col">layers</th>
                  <th scope="col">state</th>
                  <th scope="col">tokens served</th>
                  <th scope="col">pending payout</th>
                </tr>
              </thead>
              <tbody>
                {pool.nodes.map((n) => (
                  <tr key={n.node_id}>
                    <td>
                      <code>{n.node_id}</code>
                    </td>
                    <td>{short(n.operator, 14)}</td>
                    <td>{n.layers}</td>
                    <td>{n.admitted ? "admitted" : "registered"}</td>
                    <td>
                      {n.served_tokens} <span class="small">({n.served_total} ever)</span>
                    </td>
                    <td>{n.pending_payout}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
          <button type="button" disabled={busy || !getApiKey()} onClick={() => void withdraw()}>
            Withdraw my earnings
          </button>
        </section>
      )}
    </div>
  );
}
