// The chat page: model picker, conversations, sampling settings, streamed answers,
// a stop button, and under each answer its usage and verification panel.

import type { JSX } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";
import { ApiError, authHeaders, errorOf, errorText, getApiKey, getJson } from "./api";
import { type Bytes, concat, fromHex, randomBytes, toHex, utf8 } from "./bytes";
import { Markdown } from "./markdown";
import { SEALED_CONTENT_TYPE, SEALED_PATH, openedBody, sealRequest } from "./sealed";
import { responseChunks, sseFromChunks } from "./sse";
import {
  type Conversation,
  type Message,
  type Usage,
  loadConversations,
  newConversation,
  saveConversations,
} from "./store";
import { type SegmentJson, verifySegments } from "./segments";
import { VerificationPanel } from "./verification";
import {
  type AnswerClaims,
  type BundleJson,
  type ReceiptJson,
  checkBundle,
  verifyChain,
} from "./verify";

interface Settings {
  temperature: number;
  top_p: number;
  max_tokens: number;
  seed: string;
}

interface StreamEvent {
  id?: string;
  choices?: { delta?: { content?: string } }[];
  usage?: Usage;
  receipts?: ReceiptJson[];
  receipt_segments?: SegmentJson[];
  served_by?: string[];
  teeshard?: { request_id: string; completion_token_ids: number[] };
  error?: { message: string; code?: string };
}

const SEALED_SETTING = "teeshard.sealed";

/** Send `body` sealed to the entry node in `bundles[0]`, after checking its bundle here. */
async function sendSealed(
  bundles: BundleJson[],
  nonce: Bytes,
  body: Bytes,
  signal: AbortSignal,
): Promise<AsyncIterable<Uint8Array>> {
  const entry = bundles[0];
  if (entry === undefined) throw new Error("the entry node sent no attestation bundle");
  const signer = await checkBundle(entry, nonce);
  const failed = signer.checks.filter((c) => !c.ok);
  if (failed.length) {
    throw new Error(`not sealing: the entry node's attestation fails (${failed[0].name})`);
  }
  const { sealed, reader } = await sealRequest(
    fromHex(signer.fingerprint),
    fromHex(entry.sealing_public_key),
    "/v1/chat/completions",
    body,
    getApiKey(),
  );
  const response = await fetch(SEALED_PATH, {
    method: "POST",
    headers: { "Content-Type": SEALED_CONTENT_TYPE },
    body: sealed,
    signal,
  });
  if (!response.ok) throw await errorOf(response);
  const opened = openedBody(response, reader);
  const first = await opened.next(); // the head has been opened by now
  if (reader.status !== 200) {
    const parts = first.done ? [] : [first.value];
    for await (const part of opened) parts.push(part);
    const text = new TextDecoder().decode(concat(...parts));
    let error: { message?: string; code?: string } = {};
    try {
      error = (JSON.parse(text) as { error?: typeof error }).error ?? {};
    } catch {
      /* not JSON: the status says enough */
    }
    throw new ApiError(reader.status ?? 500, error.message ?? `HTTP ${reader.status}`, error.code);
  }
  return (async function* () {
    if (!first.done) yield first.value;
    yield* opened;
  })();
}

async function fetchBundles(nonce: Uint8Array): Promise<BundleJson[]> {
  const chain = await getJson<{ bundles: BundleJson[] }>(
    `/v1/attestation/chain?nonce=${toHex(nonce)}`,
  );
  return chain.bundles;
}

function Conversations(props: {
  list: Conversation[];
  current: string;
  onSelect: (id: string) => void;
  onNew: () => void;
  onRename: (id: string, title: string) => void;
  onDelete: (id: string) => void;
}): JSX.Element {
  const [editing, setEditing] = useState<string | null>(null);
  return (
    <nav class="conversations" aria-label="Conversations">
      <button type="button" onClick={props.onNew}>
        + New conversation
      </button>
      <ul>
        {props.list.map((c) => (
          <li key={c.id} class={c.id === props.current ? "current" : ""}>
            {editing === c.id ? (
              <form
                onSubmit={(e) => {
                  e.preventDefault();
                  const input = (e.currentTarget as HTMLFormElement).elements.namedItem(
                    "title",
                  ) as HTMLInputElement;
                  props.onRename(c.id, input.value.trim() || c.title);
                  setEditing(null);
                }}
              >
                <label class="visually-hidden" for={`title-${c.id}`}>
                  Conversation name
                </label>
                <input id={`title-${c.id}`} name="title" value={c.title} autoFocus />
                <button type="submit">Save</button>
              </form>
            ) : (
              <>
                <button
                  type="button"
                  class="link"
                  aria-current={c.id === props.current ? "true" : undefined}
                  onClick={() => props.onSelect(c.id)}
                >
                  {c.title}
                </button>
                <button
                  type="button"
                  class="icon"
                  aria-label={`Rename ${c.title}`}
                  onClick={() => setEditing(c.id)}
                >
                  ✎
                </button>
                <button
                  type="button"
                  class="icon"
                  aria-label={`Delete ${c.title}`}
                  onClick={() => props.onDelete(c.id)}
                >
                  ✕
                </button>
              </>
            )}
          </li>
        ))}
      </ul>
    </nav>
  );
}

function MessageView({ message }: { message: Message }): JSX.Element {
  if (message.role === "user") {
    return (
      <div class="message user">
        <div class="who">You</div>
        <div class="text">{message.content}</div>
      </div>
    );
  }
  const usage = message.usage;
  return (
    <div class="message assistant" data-testid="answer">
      <div class="who">Model</div>
      <Markdown text={message.content} />
      {message.stopped && <p class="small">Stopped.</p>}
      {message.error && (
        <p class="error" role="alert">
          {message.error}
        </p>
      )}
      {usage && (
        <p class="small usage" data-testid="usage">
          {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens
          {usage.cost !== undefined && ` · cost ${usage.cost}`}
          {usage.balance !== undefined && ` · balance ${usage.balance}`}
        </p>
      )}
      {message.report && <VerificationPanel report={message.report} />}
    </div>
  );
}

export function ChatPage(): JSX.Element {
  const [models, setModels] = useState<string[]>([]);
  const [model, setModel] = useState("");
  const [list, setList] = useState<Conversation[]>(() => {
    const stored = loadConversations();
    return stored.length ? stored : [newConversation()];
  });
  const [current, setCurrent] = useState(list[0].id);
  const [settings, setSettings] = useState<Settings>({
    temperature: 0.7,
    top_p: 1,
    max_tokens: 128,
    seed: "",
  });
  const [sealedMode, setSealedMode] = useState(localStorage.getItem(SEALED_SETTING) === "1");
  const [input, setInput] = useState("");
  const [busy, setBusy] = useState(false);
  const [loadError, setLoadError] = useState("");
  const abort = useRef<AbortController | null>(null);
  const inputRef = useRef<HTMLTextAreaElement>(null);

  useEffect(() => {
    getJson<{ data: { id: string }[] }>("/v1/models")
      .then((d) => {
        setModels(d.data.map((m) => m.id));
        setModel(d.data[0]?.id ?? "");
      })
      .catch((e: unknown) => setLoadError(errorText(e)));
  }, []);
  useEffect(() => saveConversations(list), [list]);

  const conversation = list.find((c) => c.id === current) ?? list[0];

  function update(id: string, change: (c: Conversation) => Conversation): void {
    setList((all) => all.map((c) => (c.id === id ? change(c) : c)));
  }

  function setLast(id: string, change: (m: Message) => Message): void {
    update(id, (c) => {
      const messages = c.messages.slice();
      messages[messages.length - 1] = change(messages[messages.length - 1]);
      return { ...c, messages, updated: Date.now() };
    });
  }

  async function send(event: Event): Promise<void> {
    event.preventDefault();
    const text = input.trim();
    if (!text || busy || !model) return;
    const id = conversation.id;
    const history = conversation.messages
      .filter((m) => !m.error && m.content)
      .map((m) => ({ role: m.role, content: m.content }));
    history.push({ role: "user", content: text });
    setInput("");
    update(id, (c) => ({
      ...c,
      title: c.messages.length === 0 ? text.slice(0, 40) : c.title,
      messages: [...c.messages, { role: "user", content: text }, { role: "assistant", content: "" }],
    }));
    const request: Record<string, unknown> = {
      model,
      messages: history,
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: settings.max_tokens,
      temperature: settings.temperature,
      top_p: settings.top_p,
    };
    if (settings.seed.trim() !== "") request.seed = Number(settings.seed);
    const body = utf8(JSON.stringify(request)); // exactly these bytes are sent and hashed
    const controller = new AbortController();
    abort.current = controller;
    setBusy(true);
    let reply = "";
    let receipts: ReceiptJson[] = [];
    let segments: SegmentJson[] = [];
    let promptTokens: number | undefined;
    const claims: AnswerClaims = {};
    const sealed = sealedMode;
    try {
      const nonce = randomBytes(32);
      let bundles: BundleJson[] | null = null;
      let chunks: AsyncIterable<Uint8Array>;
      if (sealed) {
        bundles = await fetchBundles(nonce); // the entry node's key to seal to, checked first
        chunks = await sendSealed(bundles, nonce, body, controller.signal);
      } else {
        const response = await fetch("/v1/chat/completions", {
          method: "POST",
          headers: { "Content-Type": "application/json", ...authHeaders() },
          body,
          signal: controller.signal,
        });
        if (!response.ok) throw await errorOf(response);
        chunks = responseChunks(response);
      }
      for await (const raw of sseFromChunks(chunks)) {
        const item = raw as StreamEvent;
        if (item.error) throw new ApiError(0, item.error.message, item.error.code ?? null);
        if (item.id) claims.responseId = item.id;
        for (const choice of item.choices ?? []) {
          if (choice.delta?.content) {
            reply += choice.delta.content;
            const now = reply;
            setLast(id, (m) => ({ ...m, content: now }));
          }
        }
        if (item.usage) {
          const usage = item.usage;
          promptTokens = usage.prompt_tokens;
          setLast(id, (m) => ({ ...m, usage }));
        }
        if (item.receipts) {
          receipts = item.receipts;
          segments = item.receipt_segments ?? [];
          claims.servedBy = item.served_by ?? [];
          claims.requestId = item.teeshard?.request_id;
          claims.tokenIds = item.teeshard?.completion_token_ids;
        }
      }
      const chain = bundles ?? (await fetchBundles(nonce));
      let report = await verifyChain(receipts, chain, body, nonce, {
        ...claims, // after a failover the last route sent only the last segment's tokens
        tokenIds: segments.length ? claims.tokenIds?.slice(segments[segments.length - 1].tokens[0])
                                  : claims.tokenIds,
      });
      if (segments.length) {
        const checked = await verifySegments(segments, receipts, chain, body, nonce,
                                             { ...claims, promptTokens });
        const ok = report.ok && checked.problems.length === 0 && checked.reports.every((r) => r.ok);
        report = { ...report, ok, problems: [...report.problems, ...checked.problems],
                   segments: checked.reports };
      }
      setLast(id, (m) => ({ ...m, report: { ...report, sealed } }));
    } catch (error) {
      if (controller.signal.aborted) setLast(id, (m) => ({ ...m, stopped: true }));
      else setLast(id, (m) => ({ ...m, error: errorText(error) }));
    } finally {
      setBusy(false);
      abort.current = null;
      inputRef.current?.focus();
    }
  }

  function field(name: keyof Settings, label: string, attrs: Record<string, string | number>) {
    return (
      <label>
        {label}
        <input
          type="number"
          name={name}
          value={settings[name]}
          {...attrs}
          onInput={(e) => {
            const value = (e.currentTarget as HTMLInputElement).value;
            setSettings((s) => ({ ...s, [name]: name === "seed" ? value : Number(value) }));
          }}
        />
      </label>
    );
  }

  return (
    <div class="chat-layout">
      <Conversations
        list={list}
        current={conversation.id}
        onSelect={setCurrent}
        onNew={() => {
          const c = newConversation();
          setList((all) => [c, ...all]);
          setCurrent(c.id);
        }}
        onRename={(id, title) => update(id, (c) => ({ ...c, title }))}
        onDelete={(id) => {
          const rest = list.filter((c) => c.id !== id);
          const next = rest.length ? rest : [newConversation()];
          setList(next);
          if (id === current) setCurrent(next[0].id);
        }}
      />
      <section class="chat" aria-label="Chat">
        <div class="toolbar">
          <label>
            Model
            <select value={model} onChange={(e) => setModel((e.currentTarget as HTMLSelectElement).value)}>
              {models.map((m) => (
                <option key={m} value={m}>
                  {m}
                </option>
              ))}
            </select>
          </label>
          <details class="settings">
            <summary>Sampling</summary>
            <div class="fields">
              {field("temperature", "Temperature", { min: 0, max: 2, step: 0.1 })}
              {field("top_p", "Top-p", { min: 0.01, max: 1, step: 0.01 })}
              {field("max_tokens", "Max tokens", { min: 1, max: 4096, step: 1 })}
              {field("seed", "Seed", { min: 0, step: 1, placeholder: "random" })}
            </div>
          </details>
          <label class="switch" title="HPKE-seal each request to the entry node's attested key">
            <input
              type="checkbox"
              checked={sealedMode}
              onChange={(e) => {
                const on = (e.currentTarget as HTMLInputElement).checked;
                localStorage.setItem(SEALED_SETTING, on ? "1" : "0");
                setSealedMode(on);
              }}
            />{" "}
            Sealed mode
          </label>
        </div>
        {loadError && (
          <p class="error" role="alert">
            {loadError}
          </p>
        )}
        <div class="log" aria-live="polite" aria-busy={busy}>
          {conversation.messages.length === 0 && (
            <p class="small empty">
              Your prompt is plaintext only inside the entry node; later nodes see hidden states
              only. Every answer is signed by every stage, and checked here in your browser.
            </p>
          )}
          {conversation.messages.map((m, i) => (
            <MessageView key={i} message={m} />
          ))}
        </div>
        <form class="composer" onSubmit={(e) => void send(e)}>
          <label class="visually-hidden" for="prompt">
            Message
          </label>
          <textarea
            id="prompt"
            ref={inputRef}
            rows={2}
            placeholder="Say something… (Enter sends, Shift+Enter for a new line)"
            value={input}
            onInput={(e) => setInput((e.currentTarget as HTMLTextAreaElement).value)}
            onKeyDown={(e) => {
              if (e.key === "Enter" && !e.shiftKey) {
                e.preventDefault();
                (e.currentTarget as HTMLTextAreaElement).form?.requestSubmit();
              }
            }}
          />
          {busy ? (
            <button type="button" class="stop" onClick={() => abort.current?.abort()}>
              Stop
            </button>
          ) : (
            <button type="submit" disabled={!model}>
              Send
            </button>
          )}
        </form>
      </section>
    </div>
  );
}
