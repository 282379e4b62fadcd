// The teeshard console: one page app served by the entry node, hash-routed.

import { render } from "preact";
import type { JSX } from "preact";
import { useEffect, useState } from "preact/hooks";
import { AccountPage } from "./account";
import { ChatPage } from "./chat";
import { NetworkPage } from "./network";
import { PoolPage } from "./pool";

const PAGES = {
  chat: { title: "Chat", view: ChatPage },
  account: { title: "Account", view: AccountPage },
  network: { title: "Network", view: NetworkPage },
  pool: { title: "Pool", view: PoolPage },
} as const;
type PageName = keyof typeof PAGES;

function current(): PageName {
  const name = location.hash.replace(/^#\/?/, "");
  return name in PAGES ? (name as PageName) : "chat";
}

function App(): JSX.Element {
  const [page, setPage] = useState<PageName>(current());
  useEffect(() => {
    const onHash = () => {
      setPage(current());
      document.getElementById("main")?.focus();
    };
    addEventListener("hashchange", onHash);
    return () => removeEventListener("hashchange", onHash);
  }, []);
  useEffect(() => {
    document.title = `${PAGES[page].title} · teeshard`;
  }, [page]);
  const View = PAGES[page].view;
  return (
    <>
      <a
        class="skip"
        href={`#/${page}`}
        onClick={(e) => {
          e.preventDefault();
          document.getElementById("main")?.focus();
        }}
      >
        Skip to content
      </a>
      <header class="top">
        <span class="brand">teeshard</span>
        <nav aria-label="Pages">
          {(Object.keys(PAGES) as PageName[]).map((name) => (
            <a key={name} href={`#/${name}`} aria-current={name === page ? "page" : undefined}>
              {PAGES[name].title}
            </a>
          ))}
        </nav>
      </header>
      <main id="main" tabIndex={-1}>
        <View />
      </main>
    </>
  );
}

render(<App />, document.getElementById("app") as HTMLElement);
