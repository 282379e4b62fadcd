// Build the console into the Python package (src/teeshard/entry/static/) and record
// the SHA-256 of the sources it came from (the same digest as
// teeshard.entry.console_static.sources_digest), so a stale build is caught.
import { createHash } from "node:crypto";
import { copyFileSync, readFileSync, readdirSync, statSync, writeFileSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const web = dirname(fileURLToPath(import.meta.url));
const out = join(web, "..", "src", "teeshard", "entry", "static");
const FILES = ["package.json", "package-lock.json", "build.mjs", "tsconfig.json"];

function walk(dir) {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    return statSync(path).isDirectory() ? walk(path) : [path];
  });
}

function sourcesDigest() {
  const files = [...FILES.map((f) => join(web, f)), ...walk(join(web, "src"))];
  const rel = files.map((f) => relative(web, f).split("\\").join("/")).sort();
  const digest = createHash("sha256");
  for (const name of rel) {
    const hash = createHash("sha256").update(readFileSync(join(web, name))).digest("hex");
    digest.update(`${name}\0${hash}\n`);
  }
  return digest.digest("hex");
}

await esbuild.build({
  entryPoints: [join(web, "src", "main.tsx")],
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: true,
  legalComments: "none",
  jsx: "automatic",
  jsxImportSource: "preact",
  outfile: join(out, "console.js"),
  logLevel: "warning",
});
copyFileSync(join(web, "src", "styles.css"), join(out, "console.css"));
copyFileSync(join(web, "src", "index.html"), join(out, "index.html"));
const info = { sources_sha256: sourcesDigest(), built_by: "web/build.mjs (esbuild)" };
writeFileSync(join(out, "console.build.json"), `${JSON.stringify(info, null, 2)}\n`);
console.log(`console built: ${relative(process.cwd(), out)} (sources ${info.sources_sha256.slice(0, 16)})`);
