"""report.html and compare.html: one self-contained page a person reads first.

The verdict on top, then the gates coloured by outcome, the model's own answers for each kind of outcome
(the failing step marked), the plots, and the summary's tables rendered as HTML tables (markdown-it). No
network: images are inline data URIs and there is no external style or script.
"""

from __future__ import annotations

import base64
import html

from markdown_it import MarkdownIt

_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")


def markdown_html(text: str) -> str:
    """Markdown (with pipe tables) as HTML; raw HTML in the text is escaped, not passed through."""
    return _MARKDOWN.render(text)


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def gates_html(gates: dict | None) -> str:
    """The gate table, each row coloured by its status (pass, fail, skip)."""
    if not gates:
        return ""
    rows = "".join(
        f'<tr class="{html.escape(g["status"])}"><td>{html.escape(g["name"])}</td><td>{html.escape(g["status"])}</td>'
        f"<td>{html.escape(_short(g['value']))}</td><td>{html.escape(_short(g['threshold']))}</td>"
        f"<td>{html.escape(g['source'])}</td></tr>"
        for g in gates["gates"]
    )
    head = "<tr><th>gate</th><th>status</th><th>value</th><th>threshold</th><th>from</th></tr>"
    return f'<h2>Quality gates</h2>\n<table class="gates"><thead>{head}</thead><tbody>{rows}</tbody></table>'


# Kinds of outcome, the final model against the strongest baseline, item by item (None: no baseline row).
OUTCOMES = {
    "improved": lambda base, final: base is not None and not base["correct"] and final["correct"],
    "regressed": lambda base, final: base is not None and base["correct"] and not final["correct"],
    "still wrong": lambda base, final: (base is None or not base["correct"]) and not final["correct"],
    "right answer, invalid work": lambda base, final: final["correct"] and final.get("work_valid") is False,
    "truncated": lambda base, final: final["finish_reason"] == "length",
}


def outcome_examples(data: dict, per_kind: int = 2) -> dict[str, list[tuple[dict | None, dict]]]:
    """For each kind of outcome, up to `per_kind` (baseline row, final row) pairs in eval-set order."""
    final = data.predictions["final"]
    base_rows = data.predictions.get("strongest_baseline", [])
    base = {r["id"]: r for r in base_rows}
    return {
        kind: [(base.get(r["id"]), r) for r in final if matches(base.get(r["id"]), r)][:per_kind]
        for kind, matches in OUTCOMES.items()
    }


def completion_html(row: dict) -> str:
    """A completion line by line; the first step the checker found false is marked."""
    bad = row.get("first_bad_step")
    lines = []
    for line in row["completion"].splitlines() or [""]:
        text = html.escape(line)
        if bad is not None and line.strip().startswith((f"{bad}.", f"{bad})")):
            text = f'<mark class="bad-step" title="the step checker found this step false">{text}</mark>'
        lines.append(text)
    return '<pre class="completion">' + "\n".join(lines) + "</pre>"


def _answer(row: dict | None) -> str:
    if row is None:
        return "-"
    verdict = "verified" if row.get("verified") else "right" if row["correct"] else "wrong"
    return f"{html.escape(str(row.get('extracted_answer')))} ({verdict}, {html.escape(row['finish_reason'])})"


def examples_html(data: dict) -> str:
    """The model's own words: prompt, expected answer and both models' completions, per kind of outcome."""
    kinds = outcome_examples(data)
    if not any(kinds.values()):
        return ""
    strongest = (data.comparison or {}).get("strongest_baseline", "")
    base_name = strongest.replace("_", "-") + " base model" if strongest else "baseline"
    parts = ["<h2>The model's own words</h2>"]
    for kind, pairs in kinds.items():
        if not pairs:
            continue
        parts.append(f"<h3>{html.escape(kind)}</h3>")
        for base, final in pairs:
            parts.append(
                f'<div class="example"><p><code>{html.escape(final["id"])}</code> {html.escape(final["prompt"])}<br>'
                f"expected <strong>{html.escape(final['expected_answer'])}</strong>; fine-tuned: {_answer(final)}; "
                f"{html.escape(base_name)}: {_answer(base)}</p>"
                f'<div class="pair"><div><h4>fine-tuned</h4>{completion_html(final)}</div>'
                + (f"<div><h4>{html.escape(base_name)}</h4>{completion_html(base)}</div>" if base else "")
                + "</div></div>"
            )
    return "\n".join(parts)


def plots_html(plots: list[tuple[str, bytes]]) -> str:
    return "\n".join(
        f'<figure><img class="plot" alt="{html.escape(t)}" src="data:image/png;base64,{base64.b64encode(p).decode()}">'
        f"<figcaption>{html.escape(t)}</figcaption></figure>"
        for t, p in plots
    )


def without_sections(markdown: str, titles: tuple[str, ...]) -> str:
    """The markdown minus its leading title and verdict lines and the `## ` sections named (shown above)."""
    kept, skipping = [], False
    body = markdown.split("\n## ", 1)
    for block in ("## " + body[1]).split("\n## ") if len(body) > 1 else []:
        block = block if block.startswith("## ") else "## " + block
        skipping = block[3:].split("\n", 1)[0].strip() in titles
        if not skipping:
            kept.append(block)
    return "\n\n".join(kept)


def page(title: str, verdict: str, verdict_class: str, body: str, num_plots: int) -> str:
    return _HTML.format(
        title=html.escape(title),
        verdict=html.escape(verdict),
        verdict_class=verdict_class,
        body=body,
        num_plots=num_plots,
    )


# Self-contained: images are inline data URIs; the small script records how many plots decoded, which the
# browser test reads back.
_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body{{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em;color:#222}}
.verdict{{font-size:1.2em;padding:0.8em 1em;border-radius:6px;border:1px solid}}
.verdict.good{{background:#e8f5e9;border-color:#66bb6a}} .verdict.bad{{background:#ffebee;border-color:#e57373}}
.verdict.neutral{{background:#f5f5f5;border-color:#bbb}}
table{{border-collapse:collapse;margin:0.5em 0 1em}} th,td{{border:1px solid #ccc;padding:0.25em 0.6em;text-align:left}}
th{{background:#f0f0f0}} tr.pass td{{background:#e8f5e9}} tr.fail td{{background:#ffcdd2}} tr.skip td{{background:#eee;color:#666}}
img.plot{{max-width:100%;border:1px solid #ddd}} pre{{white-space:pre-wrap;background:#f7f7f7;padding:0.6em}}
mark.bad-step{{background:#ffcc80}} .pair{{display:flex;gap:1em}} .pair>div{{flex:1;min-width:0}}
.example{{border-top:1px solid #ddd;padding-top:0.5em}}
</style>
</head><body data-plots-expected="{num_plots}" data-plots-rendered="pending">
<h1>{title}</h1>
<p class="verdict {verdict_class}" id="verdict">{verdict}</p>
{body}
<script>
window.addEventListener("load", function () {{
  var imgs = Array.prototype.slice.call(document.querySelectorAll("img.plot"));
  var ok = imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length;
  document.body.setAttribute("data-plots-rendered", String(ok));
}});
</script>
</body></html>
"""
