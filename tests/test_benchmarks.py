"""The benchmark commands the README quotes run and print their JSON line."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_input_pipeline_benchmark_prints_its_figures(tfds_dir):
  command = [
    sys.executable,
    'benchmarks/input_pipeline.py',
    '--data=synthetic_roads/small',
    '--batch=4',
    '--batches=3',
    '--step',
    '--base_width=2',
    '--steps=1',
  ]
  env = {**os.environ, 'TFDS_DATA_DIR': tfds_dir}
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert result.returncode == 0, result.stderr[-2000:]
  figures = json.loads(result.stdout.strip().splitlines()[-1])
  assert figures['images_per_sec'] > 0 and figures['step_images_per_sec'] > 0
  ratio = figures['images_per_sec'] / figures['step_images_per_sec']
  assert figures['pipeline_over_step'] == pytest.approx(ratio, rel=0.05, abs=0.1)
