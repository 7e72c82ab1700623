#!/usr/bin/env python3
"""Turn Debian's `fortunes` files into the corpus of `data.dataset: lines`.

Each fortune file (`/usr/share/games/fortunes/<name>`) holds quotes separated by
lines that are a lone `%`. Every quote is joined into one paragraph and cut into
sentences after `.`, `!` or `?` followed by a space and an upper-case letter, a
digit or a quotation mark. Each sentence becomes one line
`<file>\t<quote id>\t<sentence>`: the label is the fortune file, the quote id
groups the sentences of one quote (Quick-Thought's pairs are consecutive
sentences of one quote).

Quotes go to `test.tsv` when the SHA-256 of `<file>/<quote number>` falls in
the first fifth of its range, to `train.tsv` otherwise, so the split does not
move when a file gains quotes. ASCII-art files and the offensive `off/`
directory are left out.

It also writes `tokenizer.json`, a Hugging Face word-level tokenizer of the
training sentences (lower-cased; words and runs of punctuation as the
`Whitespace` pre-tokenizer splits them; the words seen at least twice, most
frequent first; `[CLS] sentence [SEP]`, padded with `[PAD]`), for
`data.text.tokenizer`. Standard library only.

    python3 tools/fortunes_to_lines.py [--src DIR] [--out DIR]
"""

import argparse
import hashlib
import json
import os
import re
import sys

SKIP = {"art", "ascii-art"}
SENTENCE_END = re.compile(r"(?<=[.!?])[\"')]?\s+(?=[\"'(]?[A-Z0-9])")


def quotes(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    for block in re.split(r"^%\s*$", text, flags=re.M):
        para = " ".join(block.split())
        if para:
            yield para


def sentences(para):
    out = []
    for s in SENTENCE_END.split(para):
        s = s.strip().replace("\t", " ")
        if len(s) >= 3 and any(c.isalpha() for c in s):
            out.append(s)
    return out


SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def word_tokenizer(sentences, min_count=2):
    counts = {}
    for s in sentences:
        for w in re.findall(r"\w+|[^\w\s]+", s.lower()):
            counts[w] = counts.get(w, 0) + 1
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    vocab = {t: i for i, t in enumerate(SPECIALS + words)}
    special = lambda t: {"id": vocab[t], "content": t, "single_word": False, "lstrip": False,
                         "rstrip": False, "normalized": False, "special": True}
    seq = lambda name: {"Sequence": {"id": name, "type_id": 0}}
    tok = lambda t: {"SpecialToken": {"id": t, "type_id": 0}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [special(t) for t in SPECIALS],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [tok("[CLS]"), seq("A"), tok("[SEP]")],
            "pair": [tok("[CLS]"), seq("A"), tok("[SEP]"), seq("B"), tok("[SEP]")],
            "special_tokens": {t: {"id": t, "ids": [vocab[t]], "tokens": [t]} for t in ("[CLS]", "[SEP]")},
        },
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="/usr/share/games/fortunes")
    ap.add_argument("--out", default="data/fortunes")
    args = ap.parse_args()
    names = sorted(
        n for n in os.listdir(args.src)
        if os.path.isfile(os.path.join(args.src, n)) and "." not in n and n not in SKIP
    )
    if not names:
        sys.exit(f"fortunes_to_lines: no fortune file in {args.src} (install Debian's fortunes package)")
    os.makedirs(args.out, exist_ok=True)
    counts = {"train": 0, "test": 0}
    train_sentences = []
    files = {k: open(os.path.join(args.out, f"{k}.tsv.partial"), "w", encoding="utf-8") for k in counts}
    for name in names:
        for q, para in enumerate(quotes(os.path.join(args.src, name))):
            digest = hashlib.sha256(f"{name}/{q}".encode()).digest()
            split = "test" if digest[0] < 256 // 5 else "train"
            for s in sentences(para):
                files[split].write(f"{name}\t{name}/{q}\t{s}\n")
                counts[split] += 1
                if split == "train":
                    train_sentences.append(s)
    for k, f in files.items():
        f.close()
        os.replace(os.path.join(args.out, f"{k}.tsv.partial"), os.path.join(args.out, f"{k}.tsv"))
    tokenizer = word_tokenizer(train_sentences)
    with open(os.path.join(args.out, "tokenizer.json.partial"), "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    os.replace(os.path.join(args.out, "tokenizer.json.partial"), os.path.join(args.out, "tokenizer.json"))
    print(f"fortunes_to_lines: {len(tokenizer['model']['vocab'])} words in tokenizer.json")
    print(f"fortunes_to_lines: {len(names)} files, {counts['train']} training and {counts['test']} test sentences in {args.out}")


if __name__ == "__main__":
    main()
