"""The methods × ratios grid on the shared SmolLM2, as committed in docs/compare/:

    python bench/compare.py [--out docs/compare] [--nsamples 32] [--seqlen 256] [--limit 100]

Same as `python -m slimgpt_core compare` with these defaults; prints the Markdown table."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimgpt_core.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    defaults = {"--model": "default", "--ratios": "0.2,0.5", "--calib": "c4", "--nsamples": "32", "--seqlen": "256",
                "--ppl": "wikitext2", "--ppl-windows": "64", "--tasks": "piqa,arc_easy,boolq", "--limit": "100",
                "--out": "docs/compare"}
    for flag, value in defaults.items():
        if flag not in args:
            args += [flag, value]
    code = main(["compare", *args])
    out = Path(args[args.index("--out") + 1])
    if code == 0:
        print((out / "compare.md").read_text())
    sys.exit(code)
