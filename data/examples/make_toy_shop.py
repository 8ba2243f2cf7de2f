"""Writes the synthetic `toy_shop` example (data/examples/toy_shop/): an interaction log and an
item file in the generic format of `oxyjax.data.readers.read_interactions`.

  python data/examples/make_toy_shop.py

Deterministic (seed 0). 120 items in 6 categories; 300 users, each mostly browsing one
category in a rough item order (so next-item prediction has something to learn), 6-14
interactions each with Unix timestamps, some ISO dates, a few ties, and an action column.
Synthetic, made for this repository; same licence as the repository.
"""

import csv
import datetime
import os

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_shop")
CATEGORIES = ["Kitchen > Cookware", "Kitchen > Knives", "Garden > Tools", "Garden > Seeds", "Office > Paper",
              "Office > Pens"]
NOUNS = {"Cookware": "pan", "Knives": "knife", "Tools": "trowel", "Seeds": "seed packet", "Paper": "notebook",
         "Pens": "pen"}
ADJ = ["red", "steel", "large", "compact", "classic", "premium", "eco", "blue", "light", "heavy", "mini", "pro",
       "soft", "bright", "smart", "rustic", "sleek", "travel", "deluxe", "basic"]


def main():
  rng = np.random.default_rng(0)
  os.makedirs(OUT, exist_ok=True)
  items = []
  for c, cat in enumerate(CATEGORIES):
    noun = NOUNS[cat.split(" > ")[1]]
    for j in range(20):
      items.append((f"SKU{c * 20 + j:04d}", f"{ADJ[j].capitalize()} {noun} {c * 20 + j}", f"Brand{j % 4}", cat))
  with open(os.path.join(OUT, "items.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["item_id", "title", "brand", "categories"])
    w.writerows(items)
  t0 = 1_600_000_000
  rows = []
  for u in range(300):
    cat = int(rng.integers(len(CATEGORIES)))
    n = int(rng.integers(6, 15))
    pos = int(rng.integers(20))
    t = t0 + int(rng.integers(0, 10_000_000))
    for k in range(n):
      if rng.random() < 0.15:  # a detour to another category
        c, j = int(rng.integers(len(CATEGORIES))), int(rng.integers(20))
      else:  # mostly the next item or two along the user's category
        c, j = cat, pos % 20
        pos += int(rng.integers(1, 3))
      t += int(rng.integers(0, 3)) * 3600  # 0: a tie with the previous row (file order decides)
      stamp = str(t) if u % 10 else datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
      rows.append((f"user{u:03d}", items[c * 20 + j][0], stamp, "purchase" if rng.random() < 0.2 else "click"))
  order = rng.permutation(len(rows))  # a log is not sorted by user
  with open(os.path.join(OUT, "interactions.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["user_id", "item_id", "timestamp", "action"])
    w.writerows(rows[i] for i in order)


if __name__ == "__main__":
  main()
