#!/usr/bin/env python3
"""Image datasets for molt's demo vision model, from scikit-learn's copy of the UCI
handwritten digits (corpus/digits/digits.csv.gz: 1797 rows of 64 pixels in 0..16 and a label).

Writes two ImageFolder zips with train/ and val/ splits (every fifth image of a class is
validation), each digit upscaled from 8x8 to 32x32 (nearest neighbour, values scaled to
0..255, white on black, RGB PNG):

- digits-0to4.zip: classes 0..4, named "0".."4" -- what models/digits is pretrained on;
- digits-5to9.zip: classes 5..9, named "five".."nine" -- digits the demo model never saw, for
  the fine-tuning walk-through.

Standard library only; byte-for-byte reproducible (fixed zip timestamps, zlib level 9).

    python3 scripts/make_digits.py [--out corpus/digits]
"""

import argparse
import csv
import gzip
import io
import os
import struct
import zipfile
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "..", "corpus", "digits", "digits.csv.gz")
SCALE = 4
NAMES = {5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}


def png(rows):
    """An RGB PNG of `rows` (lists of gray values 0..255)."""
    h, w = len(rows), len(rows[0])
    raw = b"".join(b"\x00" + bytes(v for g in r for v in (g, g, g)) for r in rows)

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def upscale(pixels):
    grid = [pixels[r * 8 : r * 8 + 8] for r in range(8)]
    return [
        [round(grid[y // SCALE][x // SCALE] * 255 / 16) for x in range(8 * SCALE)]
        for y in range(8 * SCALE)
    ]


def write_zip(path, items):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in items:
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "..", "corpus", "digits"))
    args = ap.parse_args()
    with gzip.open(SOURCE, "rt") as f:
        rows = [[int(v) for v in row] for row in csv.reader(f) if row]
    seen = {}
    sets = {"digits-0to4.zip": [], "digits-5to9.zip": []}
    for row in rows:
        pixels, label = row[:64], row[64]
        n = seen.get(label, 0)
        seen[label] = n + 1
        split = "val" if n % 5 == 4 else "train"
        name = NAMES.get(label, str(label))
        target = "digits-0to4.zip" if label < 5 else "digits-5to9.zip"
        sets[target].append((f"{split}/{name}/{n:03d}.png", png(upscale(pixels))))
    os.makedirs(args.out, exist_ok=True)
    for file, items in sets.items():
        items.sort()
        write_zip(os.path.join(args.out, file), items)
        print(f"{file}: {len(items)} images")


if __name__ == "__main__":
    main()
