// The account page: the API key (kept in this browser), balance, usage, buying tokens.

import type { JSX } from "preact";
import { useEffect, useState } from "preact/hooks";
import {
  type Account,
  type Info,
  type UsageRow,
  errorText,
  getApiKey,
  getJson,
  setApiKey,
} from "./api";
import { randomBytes, toHex } from "./bytes";
import { connectWallet, hasWallet, sendLedgerTx } from "./wallet";

function KeyForm({ onChange }: { onChange: () => void }): JSX.Element {
  const [key, setKey] = useState(getApiKey());
  const [shown, setShown] = useState(false);
  return (
    <form
      class="card"
      aria-labelledby="key-heading"
      onSubmit={(e) => {
        e.preventDefault();
        setApiKey(key.trim());
        onChange();
      }}
    >
      <h2 id="key-heading">API key</h2>
      <p class="small">Stored in this browser only, and sent only to this entry node.</p>
      <label for="api-key">Your API key</label>
      <div class="row">
        {shown ? (
          <input
            id="api-key"
            type="text"
            autoComplete="off"
            spellcheck={false}
            value={key}
            onInput={(e) => setKey((e.currentTarget as HTMLInputElement).value)}
          />
        ) : (
          <input
            id="api-key"
            type="password"
            autoComplete="off"
            value={key}
            onInput={(e) => setKey((e.currentTarget as HTMLInputElement).value)}
          />
        )}
        <button type="button" onClick={() => setShown(!shown)} aria-pressed={shown}>
          {shown ? "Hide" : "Show"}
        </button>
      </div>
      <div class="row">
        <button type="submit">Save key</button>
        <button
          type="button"
          onClick={() => {
            setKey(`tsk_${toHex(randomBytes(24))}`);
            setShown(true);
          }}
        >
          Generate a new key
        </button>
        <button
          type="button"
          onClick={() => {
            setKey("");
            setApiKey("");
            onChange();
          }}
        >
          Forget key
        </button>
      </div>
    </form>
  );
}

function BuyTokens({ info, account, onDone }: { info: Info; account: Account | null; onDone: () => void }): JSX.Element {
  const [wallet, setWallet] = useState("");
  const [amount, setAmount] = useState(1000);
  const [status, setStatus] = useState("");
  const [busy, setBusy] = useState(false);
  if (info.ledger === "sql") {
    return (
      <section class="card" aria-labelledby="buy-heading">
        <h2 id="buy-heading">Buy tokens</h2>
        <p>
          This entry node keeps a SQL ledger: its operator credits accounts. Ask them to run:
        </p>
        <pre class="code">
          <code>
            {`teeshard ledger open-account YOUR_NAME\nteeshard ledger new-key --account YOUR_NAME   # gives you an API key\nteeshard ledger deposit AMOUNT --account YOUR_NAME`}
          </code>
        </pre>
      </section>
    );
  }
  async function run(action: () => Promise<void>): Promise<void> {
    setBusy(true);
    setStatus("");
    try {
      await action();
    } catch (error) {
      setStatus(errorText(error));
    } finally {
      setBusy(false);
    }
  }
  const key = getApiKey();
  return (
    <section class="card" aria-labelledby="buy-heading">
      <h2 id="buy-heading">Buy tokens with your wallet</h2>
      <p class="small">
        Ledger contract <code>{info.evm?.contract}</code> on chain {info.evm?.chain_id}; one token
        costs {info.evm?.wei_per_token} wei. Your wallet signs every transaction.
      </p>
      {!hasWallet() && <p class="error">No wallet found (window.ethereum).</p>}
      <div class="row">
        <button type="button" disabled={!hasWallet() || busy} onClick={() => void run(async () => setWallet(await connectWallet()))}>
          {wallet ? `Wallet ${wallet.slice(0, 10)}…` : "Connect wallet"}
        </button>
        {wallet && account === null && (
          <button
            type="button"
            disabled={busy || !key}
            onClick={() =>
              void run(async () => {
                setStatus("Opening your account…");
                await sendLedgerTx(wallet, { action: "open_account" }).catch(() => undefined);
                setStatus("Binding your API key…");
                await sendLedgerTx(wallet, { action: "bind_key", api_key: key });
                setStatus("Account ready.");
                onDone();
              })
            }
          >
            Open account with this key
          </button>
        )}
      </div>
      <label for="amount">Tokens to buy</label>
      <div class="row">
        <input
          id="amount"
          type="number"
          min={1}
          step={1}
          value={amount}
          onInput={(e) => setAmount(Number((e.currentTarget as HTMLInputElement).value))}
        />
        <button
          type="button"
          disabled={!wallet || busy || !(amount > 0)}
          onClick={() =>
            void run(async () => {
              setStatus("Waiting for your wallet…");
              await sendLedgerTx(wallet, {
                action: "deposit",
                account: account?.account ?? wallet,
                amount: Math.floor(amount),
              });
              setStatus(`Bought ${Math.floor(amount)} tokens.`);
              onDone();
            })
          }
        >
          Buy
        </button>
      </div>
      {status && (
        <p role="status" class="small" data-testid="wallet-status">
          {status}
        </p>
      )}
    </section>
  );
}

export function AccountPage(): JSX.Element {
  const [info, setInfo] = useState<Info | null>(null);
  const [account, setAccount] = useState<Account | null>(null);
  const [usage, setUsage] = useState<UsageRow[]>([]);
  const [error, setError] = useState("");
  const [tick, setTick] = useState(0);

  useEffect(() => {
    getJson<Info>("/v1/console/info").then(setInfo, (e: unknown) => setError(errorText(e)));
  }, []);
  useEffect(() => {
    setError("");
    if (!info || info.ledger === "none") return;
    if (!getApiKey()) {
      setAccount(null);
      setUsage([]);
      return;
    }
    getJson<Account>("/v1/console/account", true).then(setAccount, (e: unknown) => {
      setAccount(null);
      setError(errorText(e));
    });
    getJson<{ data: UsageRow[] }>("/v1/console/usage?limit=50", true).then(
      (d) => setUsage(d.data),
      () => setUsage([]),
    );
  }, [info, tick]);

  const refresh = () => setTick((t) => t + 1);
  return (
    <div class="page">
      <h1>Account</h1>
      <KeyForm onChange={refresh} />
      {info?.ledger === "none" && (
        <p class="card">This entry node has no ledger: using the model is free.</p>
      )}
      {error && (
        <p class="error" role="alert">
          {error}
        </p>
      )}
      {account && (
        <section class="card" aria-labelledby="balance-heading">
          <h2 id="balance-heading">Balance</h2>
          <p class="small">
            Account <code>{account.account}</code>
          </p>
          <dl class="numbers">
            <div>
              <dt>Available</dt>
              <dd data-testid="available">{account.available}</dd>
            </div>
            <div>
              <dt>Reserved by open requests</dt>
              <dd>{account.reserved}</dd>
            </div>
            <div>
              <dt>Earnings (operators)</dt>
              <dd>{account.earnings}</dd>
            </div>
          </dl>
          {account.free_use && (
            <p class="notice">You operate an admitted node: you use the model free.</p>
          )}
          <button type="button" onClick={refresh}>
            Refresh
          </button>
        </section>
      )}
      {info && info.ledger !== "none" && <BuyTokens info={info} account={account} onDone={refresh} />}
      {account && (
        <section class="card" aria-labelledby="usage-heading">
          <h2 id="usage-heading">Usage</h2>
          {usage.length === 0 ? (
            <p class="small">No requests yet.</p>
          ) : (
            <div class="table-wrap">
              <table>
                <thead>
                  <tr>
                    <th scope="col">when</th>
                    <th scope="col">request</th>
                    <th scope="col">state</th>
                    <th scope="col">held</th>
                    <th scope="col">cost</th>
                  </tr>
                </thead>
                <tbody>
                  {usage.map((row) => (
                    <tr key={row.request_id}>
                      <td>{new Date(row.at * 1000).toLocaleString()}</td>
                      <td>
                        <code>{row.request_id.slice(0, 12)}</code>
                      </td>
                      <td>{row.state}</td>
                      <td>{row.reserved}</td>
                      <td>{row.cost}</td>
                    </tr>
                  ))}
                </tbody>
              </table>
            </div>
          )}
        </section>
      )}
    </div>
  );
}
