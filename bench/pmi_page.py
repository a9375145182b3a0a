"""The size and the time of a page (bookkeeping/pmi_page.py) for a large evaluation, on synthetic items:

    python bench/pmi_page.py                 # 500 held-out items, two answers of 200 tokens each, and 500 pairs
    python bench/pmi_page.py --tiny          # 20 items of 20 tokens, in a second

Each item has a prompt x and x' of --prompt-chars characters and two answers of --tokens tokens, pieces of 1 to 8
characters (a few of them '<' or '&', which html.escape lengthens) with a term each; the pairs section holds
--pairs pairs of the same sizes (a page shows at most pmi_page.PAIRS_SHOWN). Reported: the page's size, the time
to render it (best of --repeat), to write it, and to parse it again with html.parser (a floor on what a browser
does with it), and the number of elements.
"""
import argparse
import random
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bookkeeping import pmi_page  # noqa: E402
from formats.files import write_atomically  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def text(rng: random.Random, chars: int) -> str:
    words = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append("".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 9))))
    return " ".join(words)[:chars]


def pieces(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(["<", "&"]) if rng.random() < 0.02 else
            " " * (rng.random() < 0.7) + "".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 7)))
            for _ in range(n)]


def synthetic_items(n: int, tokens: int, prompt_chars: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for k in range(n):
        answers = []
        for _ in range(2):
            terms = [rng.gauss(0.05, 0.6) for _ in range(tokens)]
            row = {"tokens": pieces(rng, tokens), "pmi_tokens": terms, "pmi": sum(terms), "length": tokens,
                   "stopped": rng.random() < 0.5}
            answers.append(pmi_page.answer(None, row))
        items.append({"id": f"item-{k}", "x": [{"role": "user", "content": text(rng, prompt_chars)}],
                      "x_prime": [{"role": "user", "content": text(rng, prompt_chars)}], "answers": answers})
    return items


def synthetic_pairs(n: int, tokens: int, prompt_chars: int, seed: int = 1) -> dict:
    rng = random.Random(seed)
    pairs = []
    for k in range(n):
        chat = [{"role": "user", "content": text(rng, prompt_chars)}]
        pair = {"id": f"pair-{k}", "prompt": chat, "negative_prompt": chat,
                "chosen": [{"content": "".join(pieces(rng, tokens))}],
                "rejected": [{"content": "".join(pieces(rng, tokens))}]}
        reference = {"ref_chosen_logps": -rng.uniform(20, 200), "ref_rejected_logps": -rng.uniform(20, 200),
                     "chosen_length": tokens, "rejected_length": tokens}
        pairs.append((pair, reference))
    return {"pairs": pairs[:pmi_page.PAIRS_SHOWN], "total": n, "beta": 0.1}


class Count(HTMLParser):
    def __init__(self):
        super().__init__()
        self.elements = 0

    def handle_starttag(self, tag, attrs):
        self.elements += 1


def main(argv=None):
    parser = argparse.ArgumentParser(description="Size and time of a pmi page for a large evaluation.")
    parser.add_argument("--items", type=int, default=500, help="held-out items (default 500)")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per answer (default 200)")
    parser.add_argument("--prompt-chars", type=int, default=1000, help="characters of x and of x' (default 1000)")
    parser.add_argument("--pairs", type=int, default=500, help="training pairs on the page (default 500; 0: none)")
    parser.add_argument("--repeat", type=int, default=3, help="renders timed, the best reported (default 3)")
    parser.add_argument("--tiny", action="store_true", help="20 items and 20 pairs of 20 tokens, prompts of 200")
    args = parser.parse_args(argv)
    if args.tiny:
        args.items, args.tokens, args.prompt_chars, args.pairs, args.repeat = 20, 20, 200, 20, 1
    items = synthetic_items(args.items, args.tokens, args.prompt_chars)
    pairs = synthetic_pairs(args.pairs, args.tokens, args.prompt_chars) if args.pairs else None
    for label, with_pairs in (("held-out items", None), ("held-out items and pairs", pairs)):
        if label.endswith("pairs") and pairs is None:
            continue
        seconds = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            page = pmi_page.render_page("bench", ["base", "run"], items, "synthetic items", with_pairs)
            seconds.append(time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            write_atomically(Path(tmp) / "page.html", page)
            write_s = time.perf_counter() - start
            size = (Path(tmp) / "page.html").stat().st_size
        start = time.perf_counter()
        count = Count()
        count.feed(page)
        parse_s = time.perf_counter() - start
        print(f"{label}: {args.items} items, 2 answers of {args.tokens} tokens, prompts of {args.prompt_chars} "
              f"characters{f', {args.pairs} pairs' if with_pairs else ''}: {size / 1e6:.2f} MB, "
              f"render {min(seconds):.3f} s, write {write_s:.3f} s, html.parser {parse_s:.3f} s, "
              f"{count.elements} elements", flush=True)


if __name__ == "__main__":
    main()
