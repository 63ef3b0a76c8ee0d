"""What every attnreid HTML page shares (the report and the attention index): the style sheet,
the generator tag, and the rule for the folder a page is written to.

Its own module so that ``viz.report`` (which draws attention overlays) and ``viz.attention``
(whose index page uses the style) do not import each other.
"""

from pathlib import Path

from attnreid.errors import AttnReidError

GENERATOR_TAG = '<meta name="generator" content="attnreid">'  # marks a page attnreid wrote


def check_page_folder(out_dir: Path, overwrite: bool = False) -> None:
    """Refuse, in one line, to write a page into a folder attnreid did not write: one that holds
    files but no ``index.html`` with :data:`GENERATOR_TAG` (a user's own page, a folder of photos).
    A new or empty folder, or an earlier attnreid page, is fine; ``overwrite`` allows any folder."""
    out_dir = Path(out_dir)
    if overwrite or not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    page = out_dir / "index.html"
    try:
        ours = page.is_file() and GENERATOR_TAG in page.read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError:
        ours = False
    if not ours:
        what = "holds an index.html that attnreid did not write" if page.exists() else \
            "holds files but no attnreid page"
        raise AttnReidError(f"--out {out_dir} {what}; choose a new or empty folder, "
                            f"or pass --overwrite to write into it anyway")


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       max-width: 1100px; margin: 0 auto; padding: 16px 20px 48px; color: #1b1b1b;
       background: #fff; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.3em; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 1.8em; }
h3 { font-size: 1.05em; margin-bottom: 0.3em; }
.meta { color: #666; font-size: 0.9em; }
table.metrics { border-collapse: collapse; margin: 8px 0 16px; font-variant-numeric: tabular-nums; }
table.metrics th, table.metrics td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
table.metrics th { background: #f0f3f7; }
table.metrics td.name, table.metrics th.name { text-align: left; }
table.metrics tr.best td.val { font-weight: 600; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
figure { margin: 10px 0 18px; }
figcaption { color: #555; font-size: 0.88em; }
.note { background: #fff7e0; border-left: 4px solid #e0a800; padding: 6px 10px; margin: 8px 0; }
dl.cfg { display: grid; grid-template-columns: max-content auto; gap: 2px 14px; font-size: 0.92em; }
dl.cfg dt { color: #555; } dl.cfg dd { margin: 0; }
.legend span { display: inline-block; padding: 0 6px; margin-right: 6px; color: #fff; border-radius: 3px; }
"""
