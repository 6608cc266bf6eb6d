r"""A smoke test on real anatomy: a 3-class 3-D ResUNet on nilearn's MNI152 template.

  pip install nilearn && python benchmarks/mni152.py [--steps=600] [--root=runs/mni152]

nilearn ships the MNI152 T1 template and its grey- and white-matter probability maps inside the
package (2 mm, 99x117x95; no download). This writes them as a NIfTI folder, the mask being
background 0, grey matter 1 where its probability is at least 0.5 and above white matter's,
white matter 2 likewise, then runs `experiments/train.py` on it with
`experiments/configs/volumes.py` (32^3 patches; `per_image` normalisation, three classes and no
clDice term, in a config file it writes beside the data) and
`experiments/evaluate.py`, and prints the per-class Dice of the whole volume.

It is one subject, used as training, validation and test volume alike: it shows that the 3-D
pipeline reads, trains on and scores a real NIfTI volume with its spacing and affine, and says
nothing about generalisation (benchmarks/README.md, "Volumes").
"""

import argparse
import json
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'benchmarks'))
from monuseg import cpu_name  # noqa: E402 (the CPU's name, as every figure gives it)

CONFIG = """import runpy


def get_config():
  config = runpy.run_path({volumes!r})['get_config']()
  config.data.name, config.data.folder = 'folder', {folder!r}
  config.data.label_map = {{0: 0, 1: 1, 2: 2}}
  config.data.normalization = 'per_image'
  config.train.cldice_weight = 0.0  # tissue classes are not tubes
  config.train.batch_size = 1  # one training volume
  return config
"""


def write_folder(folder: pathlib.Path) -> tuple[int, ...]:
  """The template and its tissue labels as `folder/{train,validation,test}/{images,masks}/mni152.nii.gz`."""
  from nilearn import datasets

  t1 = datasets.load_mni152_template(resolution=2)
  grey = np.asanyarray(datasets.load_mni152_gm_template(resolution=2).dataobj)
  white = np.asanyarray(datasets.load_mni152_wm_template(resolution=2).dataobj)
  labels = np.zeros(t1.shape, np.uint8)
  labels[(grey >= 0.5) & (grey >= white)] = 1
  labels[(white >= 0.5) & (white > grey)] = 2
  for split in ('train', 'validation', 'test'):
    for sub in ('images', 'masks'):
      (folder / split / sub).mkdir(parents=True, exist_ok=True)
    nib.save(
      nib.Nifti1Image(np.asanyarray(t1.dataobj).astype(np.float32), t1.affine),
      folder / split / 'images' / 'mni152.nii.gz',
    )
    nib.save(nib.Nifti1Image(labels, t1.affine), folder / split / 'masks' / 'mni152.nii.gz')
  return tuple(float((labels == k).mean()) for k in range(3))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=600)
  parser.add_argument('--root', default='runs/mni152')
  args = parser.parse_args()
  root = pathlib.Path(args.root)
  shares = write_folder(root / 'data')
  print(f'MNI152 2 mm, 99x117x95; voxel shares background/grey/white {shares[0]:.3f}/{shares[1]:.3f}/{shares[2]:.3f}')
  workdir = root / 'run'
  config = root / 'config.py'  # a label map cannot be given on the command line: a config file over volumes.py
  config.write_text(CONFIG.format(volumes=str(ROOT / 'experiments/configs/volumes.py'), folder=str(root / 'data')))
  flags = [
    '--model=resunet',
    f'--config={config}',
    f'--config.train.num_steps={args.steps}',
    f'--config.train.eval_every={args.steps}',
    f'--workdir={workdir}',
  ]
  subprocess.run([sys.executable, 'experiments/train.py', *flags], cwd=ROOT, check=True)
  command = [sys.executable, 'experiments/evaluate.py', f'--workdir={workdir}', '--split=test', '--checkpoint=latest']
  subprocess.run(command, cwd=ROOT, check=True)
  record = json.loads((ROOT / workdir / 'eval_test.json').read_text())
  dice = record['class_dice']
  print(
    f'MNI152 after {args.steps} steps: Dice background {dice[0]:.3f}, grey matter {dice[1]:.3f}, white matter '
    f'{dice[2]:.3f}; surface Dice (2 mm) {record["metrics"]["surface_dice"]["mean"]:.3f} on {cpu_name()}'
  )


if __name__ == '__main__':
  main()
