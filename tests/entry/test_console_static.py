"""The console's committed build is current, and its page is served under a strict CSP."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

from teeshard.entry.console_static import CONTENT_SECURITY_POLICY, sources_digest

WEB = Path(__file__).resolve().parents[2] / "web"
STATIC = resources.files("teeshard.entry").joinpath("static")


def test_the_committed_build_matches_the_web_sources() -> None:
    recorded = json.loads(STATIC.joinpath("console.build.json").read_text())["sources_sha256"]
    assert recorded == sources_digest(WEB), (
        "the console build in src/teeshard/entry/static is stale: run `npm --prefix web run build` "
        "(scripts/setup.sh does it when web/ changed) and commit the result"
    )


def test_the_digest_changes_with_any_source_file(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "package.json").write_text("{}")
    (tmp_path / "src" / "a.ts").write_text("export const a = 1;\n")
    before = sources_digest(tmp_path)
    (tmp_path / "src" / "a.ts").write_text("export const a = 2;\n")
    assert sources_digest(tmp_path) != before
    (tmp_path / "src" / "a.ts").write_text("export const a = 1;\n")
    assert sources_digest(tmp_path) == before
    (tmp_path / "src" / "b.ts").write_text("")
    assert sources_digest(tmp_path) != before


def test_the_page_loads_nothing_inline_or_from_elsewhere() -> None:
    html = STATIC.joinpath("index.html").read_text()
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", html, flags=re.S)
    assert scripts and all(body.strip() == "" for body in scripts)  # no inline script
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # no CDN, no external font
    css = STATIC.joinpath("console.css").read_text()
    assert "@import" not in css and "url(" not in css and "@font-face" not in css
    script = STATIC.joinpath("console.js").read_text()
    assert not re.search(r"""(import|from)\s*\(?\s*["']https?:""", script)  # no remote module
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY
