"""Writes tests/assets/tiny-clip-tokenizer/ (vocab.json, merges.txt, tokenizer_config.json): a CLIP BPE
tokenizer small enough for tiny random text encoders (vocab < 1000), made locally (no Hub download).

Layout as OpenAI's CLIP builds its vocabulary: the 256 byte symbols, the same with the end-of-word
mark "</w>", the merged symbols in merge order, then <|startoftext|> and <|endoftext|>. The merges
are learned by plain BPE on the short corpus below, so common prompt words become a few tokens.
Run `python tests/assets/make_tiny_clip_tokenizer.py` to rebuild the files (deterministic).
"""
import collections
import json
import os

CORPUS = """a photo of a cat sitting on a red chair
an astronaut riding a horse on the moon
a painting of a lighthouse at sunset by the sea
a bowl of fruit on a wooden table
a dog running in the snow
a high quality photograph of a mountain landscape with trees
blurry low quality ugly
"""
NUM_MERGES = 96
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny-clip-tokenizer")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    byte_map = bytes_to_unicode()
    counts = collections.Counter(words)
    split = {w: [byte_map[b] for b in w.encode()] for w in counts}
    for w in split:
        split[w][-1] += "</w>"
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for w, symbols in split.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += counts[w]
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])  # ties broken by the sorted order: deterministic
        merges.append(best)
        for w, symbols in split.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            split[w] = out
    return merges


def main() -> None:
    merges = learn_merges(CORPUS.lower().split(), NUM_MERGES)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False, indent=0)
        f.write("\n")
    with open(os.path.join(OUT, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    with open(os.path.join(OUT, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
                   "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                   "do_lower_case": True}, f, indent=2)
        f.write("\n")
    print(f"wrote {OUT}: {len(vocab)} tokens, {len(merges)} merges")


if __name__ == "__main__":
    main()
