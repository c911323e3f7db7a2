"""An exported student under AutoAttack's standard version, ours (JAX) vs torchattacks 3.5.1.

  python benchmarks/autoattack_reference.py --export=workdir/quickstart/export --eps=0.1

The student's test split (or its first --examples images) is attacked on every image by APGD-CE
(100 steps), APGD-T (9 targets x 100), FAB-T (9 targets x 100) and Square (5,000 queries, the
unrescaled schedule), then AutoAttack = their point-wise worst case: ours through
`evaluate.evaluate`, theirs through torchattacks' attacks at the reference's settings on the
student's PyTorch export (`torch_export`), plus torchattacks' own `AutoAttack('standard')`
(10-step APGD/FAB, rescaled Square; see `robust/torch_reference.py`). Needs torch and
torchattacks (`make test` installs them). Writes a Markdown table and JSON to --out.
"""

import argparse
import json
import os

import jax
import numpy as np
import torch

from rcnas_jax import config as config_lib, data
from rcnas_jax.nets import export, models, torch_export
from rcnas_jax.robust import attacks, evaluate, torch_reference
from rcnas_jax.runtime import parallel


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--export", default="workdir/quickstart/export")
  parser.add_argument("--eps", type=float, default=8 / 255)
  parser.add_argument("--norm", default="linf", choices=attacks.NORMS)
  parser.add_argument("--examples", type=int, default=0, help="0 = the whole test split")
  parser.add_argument("--out", default="benchmarks/results")
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  student = export.load_student(args.export)
  meta = student.meta
  split = data.load(meta["dataset"]).test
  if args.examples:
    split = data.Split(split.images[:args.examples], split.labels[:args.examples])
  model = models.build(student.spec, meta["num_classes"], meta["mean"], meta["std"])
  e = config_lib.base_config().evaluation
  e.update(eps=args.eps, norm=args.norm)
  threats = tuple(evaluate.settings_for(n, e) for n in torch_reference.STANDARD)
  ours = evaluate.evaluate(model, student.variables, split,
                           (attacks.ThreatModel("clean"),) + threats, jax.random.key(0),
                           parallel.data_mesh(), batch_size=e.batch_size, unroll=False,
                           composites={"autoattack": threats})
  twin = torch_export.convert(student.spec, student.variables, meta["mean"], meta["std"])
  theirs = torch_reference.autoattack(twin, split.images.astype(np.float32) / 255, split.labels,
                                      args.eps, args.norm, meta["num_classes"])
  rows = [f"Student {args.export} ({meta['dataset']} test, {len(split)} images, {args.norm} "
          f"eps={args.eps:.4g}, eval-mode BN, {os.cpu_count()} CPU cores).", "",
          "| attack | ours (%) | ours (s) | torchattacks (%) | torchattacks (s) | our settings |",
          "|---|---:|---:|---:|---:|---|"]
  table = {}
  for name, (accuracy, seconds) in theirs.items():
    mine = ours.get(name, {})
    table[name] = {"ours": mine.get("accuracy"), "ours_seconds": mine.get("seconds"),
                   "torchattacks": accuracy, "torchattacks_seconds": round(seconds, 2),
                   "settings": mine.get("attack", "torchattacks' defaults")}
    ours_cells = (f"{100 * mine['accuracy']:.2f} | {mine['seconds']:.1f}" if mine else "- | -")
    rows.append(f"| {name} | {ours_cells} | {100 * accuracy:.2f} | {seconds:.1f} | "
                f"{table[name]['settings']} |")
  text = "\n".join(rows) + "\n"
  print(text)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "autoattack_reference.md"), "w") as f:
    f.write(text)
  with open(os.path.join(args.out, "autoattack_reference.json"), "w") as f:
    json.dump(table, f, indent=2)


if __name__ == "__main__":
  main()
