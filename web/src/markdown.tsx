// A small Markdown renderer to Preact elements: fenced and inline code, headings,
// lists, quotes, bold, italic, links (http(s) only). Text never becomes HTML:
// everything is built as elements, so an answer cannot inject markup or script.

import type { ComponentChildren, JSX } from "preact";

type Inline = ComponentChildren;

function inline(text: string, key = 0): Inline[] {
  const out: Inline[] = [];
  const pattern = /(`[^`]+`)|(\*\*[^*]+\*\*)|(\*[^*\s][^*]*\*)|(\[[^\]]+\]\((https?:\/\/[^)\s]+)\))/g;
  let last = 0;
  let n = key;
  for (const match of text.matchAll(pattern)) {
    const at = match.index ?? 0;
    if (at > last) out.push(text.slice(last, at));
    const token = match[0];
    if (match[1]) out.push(<code key={n++}>{token.slice(1, -1)}</code>);
    else if (match[2]) out.push(<strong key={n++}>{inline(token.slice(2, -2), n)}</strong>);
    else if (match[3]) out.push(<em key={n++}>{inline(token.slice(1, -1), n)}</em>);
    else if (match[4]) {
      const label = token.slice(1, token.indexOf("]"));
      out.push(
        <a key={n++} href={match[5]} rel="noopener noreferrer" target="_blank">
          {label}
        </a>,
      );
    }
    last = at + token.length;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

export function Markdown({ text }: { text: string }): JSX.Element {
  const lines = text.split("\n");
  const blocks: JSX.Element[] = [];
  let i = 0;
  let key = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = /^```\s*([\w+-]*)\s*$/.exec(line);
    if (fence) {
      const code: string[] = [];
      i++;
      while (i < lines.length && !/^```\s*$/.test(lines[i])) code.push(lines[i++]);
      i++; // the closing fence (or the end of a still-streaming answer)
      blocks.push(
        <pre key={key++} class="code" data-lang={fence[1] || undefined}>
          <code>{code.join("\n")}</code>
        </pre>,
      );
      continue;
    }
    const heading = /^(#{1,4})\s+(.*)$/.exec(line);
    if (heading) {
      const level = Math.min(6, heading[1].length + 2);
      const Tag = `h${level}` as "h3";
      blocks.push(<Tag key={key++}>{inline(heading[2])}</Tag>);
      i++;
      continue;
    }
    if (/^\s*([-*+]|\d+\.)\s+/.test(line)) {
      const ordered = /^\s*\d+\./.test(line);
      const items: JSX.Element[] = [];
      while (i < lines.length && /^\s*([-*+]|\d+\.)\s+/.test(lines[i])) {
        items.push(<li key={items.length}>{inline(lines[i].replace(/^\s*([-*+]|\d+\.)\s+/, ""))}</li>);
        i++;
      }
      blocks.push(ordered ? <ol key={key++}>{items}</ol> : <ul key={key++}>{items}</ul>);
      continue;
    }
    if (/^>\s?/.test(line)) {
      const quote: string[] = [];
      while (i < lines.length && /^>\s?/.test(lines[i])) quote.push(lines[i++].replace(/^>\s?/, ""));
      blocks.push(<blockquote key={key++}>{inline(quote.join(" "))}</blockquote>);
      continue;
    }
    if (line.trim() === "") {
      i++;
      continue;
    }
    const paragraph: string[] = [];
    while (i < lines.length && lines[i].trim() !== "" && !/^(```|#{1,4}\s|>|\s*([-*+]|\d+\.)\s)/.test(lines[i])) {
      paragraph.push(lines[i++]);
    }
    if (paragraph.length === 0) paragraph.push(lines[i++]);
    blocks.push(<p key={key++}>{inline(paragraph.join("\n"))}</p>);
  }
  return <div class="markdown">{blocks}</div>;
}
