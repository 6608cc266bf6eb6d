r"""Peak memory of whole-image evaluation: one image scored at its own size through the sliding window.

  python benchmarks/whole_image.py                      # 1000x1000 and 4096x4096, ResUNet base 16
  python benchmarks/whole_image.py --sides=256,512 --base-width=4 --tile=64

Each side runs in a fresh process (`--side=S` alone) so that its peak resident memory is its own:
a random image and a mask of random disks (nuclei-like) of S x S go through `training.evaluation.score_image`
(Gaussian sliding window of `--tile` tiles, `--batch` per call, then Dice, IoU, boundary F1 and
HD95 on every pixel). Prints one JSON line per side: `peak_mb` (the process's maximum resident
set), `output_mb` (the image-sized arrays the result needs: the normalised input, the blended
logits and their weights, the predictions) and the seconds, then a line comparing the largest side
with the smallest: `ratio` = peak(largest) / (peak(smallest) + output(largest) - output(smallest)),
the issue's bound being 1.5.
"""

import argparse
import json
import resource
import subprocess
import sys
import time


def _nuclei(side: int, rng):
  """A mask of random disks of radius 4-10 px covering about a fifth of the image, as nuclei in H&E."""
  import numpy as np

  mask = np.zeros((side, side), np.int32)
  for _ in range(int(0.2 * side * side / (np.pi * 49))):
    radius = int(rng.integers(4, 11))
    y, x = (int(v) for v in rng.integers(radius, side - radius, 2))
    reach = np.arange(-radius, radius + 1)
    mask[y - radius : y + radius + 1, x - radius : x + radius + 1] |= (
      reach[:, None] ** 2 + reach[None, :] ** 2 <= radius**2
    )
  return mask


def measure(side: int, base_width: int, tile: int, batch: int) -> dict:
  import jax
  import numpy as np

  from resunet_jax import models
  from resunet_jax.training import evaluation

  model = models.UNet(models.preset('resunet', base_width=base_width))
  variables = model.init(jax.random.key(0), np.zeros((1, tile, tile, 3), np.float32), train=False)
  rng = np.random.default_rng(0)
  image = rng.normal(size=(side, side, 3)).astype(np.float32)
  mask = _nuclei(side, rng)
  apply = evaluation._tile_apply(model.apply)  # noqa: SLF001 (the evaluation's own compiled path)
  start = time.perf_counter()
  row, _ = evaluation.score_image(
    apply, (variables, {}), image, mask, tile=tile, batch_size=batch, boundary_tolerance=2.0
  )
  seconds = time.perf_counter() - start
  outputs = side * side * (3 + 1 + 1 + 1) * 4  # input, logits, weights (float32), predictions (int32)
  return {
    'benchmark': 'whole_image',
    'side': side,
    'tile': tile,
    'base_width': base_width,
    'peak_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    'output_mb': round(outputs / 2**20, 3),
    'seconds': round(seconds, 2),
    'dice': round(float(row['dice'][0]), 4),
  }


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sides', default='1000,4096', help='Image sides, comma-separated.')
  parser.add_argument('--side', type=int, help='Measure this side alone, in this process.')
  parser.add_argument('--base-width', type=int, default=16)
  parser.add_argument('--tile', type=int, default=128)
  parser.add_argument('--batch', type=int, default=8, help='Tiles per model call.')
  args = parser.parse_args(argv)
  if args.side:
    print(json.dumps(measure(args.side, args.base_width, args.tile, args.batch)))
    return
  lines = []
  for side in sorted(int(s) for s in args.sides.split(',')):
    command = [sys.executable, __file__, f'--side={side}', f'--base-width={args.base_width}']
    command += [f'--tile={args.tile}', f'--batch={args.batch}']
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    lines.append(json.loads(out.strip().splitlines()[-1]))
    print(json.dumps(lines[-1]), flush=True)
  small, large = lines[0], lines[-1]
  bound = small['peak_mb'] + large['output_mb'] - small['output_mb']
  print(
    json.dumps(
      {
        'benchmark': 'whole_image_ratio',
        'sides': [small['side'], large['side']],
        'ratio': round(large['peak_mb'] / bound, 3),
      }
    )
  )


if __name__ == '__main__':
  main(sys.argv[1:])
