r"""SID quality of a multi-domain catalogue's joint space (issue 14): the table a unified model
decodes over, beside each domain's own table.

  python benchmarks/joint_sid_report.py                      # office + industrial, the multi-scenario run's SIDs
  python benchmarks/joint_sid_report.py --domains=office,industrial --out=docs/bench/joint_sid_report.json
  python benchmarks/joint_sid_report.py --embedding=text --out=docs/bench/joint_sid_report_text.json

The joint table is `experiment.joint_sid_table`: a leading domain level, then each domain's own
content-keyed table (`SIDConfig(embedding="collaborative")` by default, as
benchmarks/multi_scenario.py trains with; `--embedding=text` for its `--sid_embedding=text`).
Reported per table: collision rate (items sharing a k-means path), per-level code usage and
perplexity, and level-1 brand purity against a shuffled-label baseline (per domain:
in the joint table level 1 is the domain, so purity is read one level down, on each domain's
own table). Also: whether any two items of different domains share a full path (they must not:
the domain level separates them), and each domain's share of the joint items.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--domains", default="office,industrial")
  ap.add_argument("--embedding", choices=["collaborative", "text"], default="collaborative",
                  help="SIDConfig.embedding of every domain's table (benchmarks/multi_scenario.py --sid_embedding)")
  ap.add_argument("--out", default=os.path.join(REPO, "docs", "bench", "joint_sid_report.json"))
  args = ap.parse_args()

  from oxyjax import experiment
  from oxyjax.data.catalogue import Catalogue
  from oxyjax.sid.table import quality_report

  domains = args.domains.split(",")
  cat = Catalogue.load(domains)
  sid = experiment.SIDConfig(embedding=args.embedding)
  joint = experiment.joint_sid_table(cat, sid)
  brands = [None] + [((m.brand or None) if m else None) for m in cat.item_meta[1:]]
  out = {"domains": domains, "sid": {"embedding": sid.embedding}, "joint": quality_report(joint, brands), "per_domain": {}}
  codes = joint.codes[1:]
  dom_of_item = codes[:, 0]
  # Distinct full paths across domains: the leading domain level keeps the domains apart.
  paths = {tuple(r) for r in codes.tolist()}
  out["joint"]["distinct_full_paths"] = len(paths)
  out["joint"]["items_per_domain"] = {d: int((dom_of_item == i).sum()) for i, d in enumerate(domains)}
  for d in domains:
    table = experiment.load_sid_table(d, sid)
    ds = cat.dataset(d)
    labels = [None] + [((m.brand or None) if m else None) for m in (ds.item_meta or [None] * (ds.num_items + 1))[1:]]
    out["per_domain"][d] = quality_report(table, labels)
  print(f"# joint SID space of {domains}: {joint.num_items} items, levels {list(joint.codebook_sizes)}")
  j = out["joint"]
  print(f"- distinct full paths: {j['distinct_full_paths']} of {joint.num_items} items; per domain "
        f"{j['items_per_domain']}; k-means-path collision rate {j['collision']['rate']:.4f}")
  print("| table | level | codebook | used | usage | perplexity |\n|---|---|---|---|---|---|")
  for name, rep in [("joint", j)] + list(out["per_domain"].items()):
    for l, lv in enumerate(rep["levels"]):
      print(f"| {name} | {l} | {lv['codebook_size']} | {lv['used']} | {lv['usage']:.3f} | {lv['perplexity']:.1f} |")
  print("\n| domain table | collision rate | max group | level-1 brand purity | shuffled | brand coverage |\n|---|---|---|---|---|---|")
  for name, rep in out["per_domain"].items():
    c = rep["collision"]
    p, s = rep.get("level1_purity"), rep.get("level1_purity_shuffled")
    print(f"| {name} | {c['rate']:.4f} | {c['max_group_size']} | {p if p is None else f'{p:.3f}'} | "
          f"{s if s is None else f'{s:.3f}'} | {rep.get('label_coverage', 0):.3f} |")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
