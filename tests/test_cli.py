"""The command line a person follows: --version, --help before torch loads, and what a run leaves
behind (its configuration, one CSV of epochs per run, epoch lines and a table that say what was
trained and served)."""
import csv
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mos.lab.cli import main
from mos.lab.config_io import load_run_config

REPO = Path(__file__).resolve().parent.parent
TINY = ["data.synthetic.num_users=160", "data.synthetic.num_items=120", "train.seeds=[0]", "train.max_epochs=2",
        "train.patience=2", "train.batch_size=64", "models=[backbone,mos]"]


def test_version_is_the_distribution_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"mos {version}"


def test_help_answers_without_loading_torch():
    """`python -m mos --help` parses before it imports: no torch, triton or lab module loads (but
    host_memory, the standard library's os only, which must act before torch makes a tensor)."""
    code = ("import sys\nfrom mos.lab.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'numpy', 'mos_kernels')"
            " or m.startswith('mos.lab.') and m not in ('mos.lab.cli', 'mos.lab.host_memory')),"
            " file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0 and "--set KEY=VALUE" in done.stdout, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "[]"


def test_a_run_leaves_its_configuration_and_epochs_behind(tmp_path, capsys):
    overrides = TINY + [f"train.out_dir={tmp_path}"]
    assert main(["train", "--config", "configs/default.yaml", "--set", *overrides]) == 0
    out, err = capsys.readouterr()
    # The merged configuration is echoed before the runs (on stdout, with the data's statistics and
    # the table: stderr keeps the epoch lines) and saved; it reads back to the same config.
    assert out.index("examples train / valid / test") < out.index("configuration (saved to") < out.index("| model |")
    assert load_run_config(str(tmp_path / "config.yaml"), []) == load_run_config("configs/default.yaml", overrides)
    # Epoch lines: BCE first, MoS's auxiliary terms and objective apart from it.
    backbone_line = next(line for line in err.splitlines() if line.startswith("backbone seed 0 epoch 1/2"))
    mos_line = next(line for line in err.splitlines() if line.startswith("mos seed 0 epoch 1/2"))
    assert re.search(r": train BCE \d\.\d{4}  valid AUC", backbone_line), backbone_line
    assert re.search(r": train BCE \d\.\d{4}  aux \w+ \d\.\d{4}.*  objective \d\.\d{4}  valid AUC", mos_line), mos_line
    for model in ("backbone", "mos"):
        with open(tmp_path / "epochs" / f"{model}-seed0.csv", newline="") as stream:
            rows = list(csv.DictReader(stream))
        assert [row["epoch"] for row in rows] == ["1", "2"]
        assert {"objective", "bce", "valid_auc", "seconds"} <= set(rows[0])
        assert all(0 < float(row["bce"]) < 2 and 0 <= float(row["valid_auc"]) <= 1 for row in rows)
        aux = [name for name in rows[0] if name.startswith("aux_")]
        assert bool(aux) == (model == "mos"), rows[0]
    # The table says whether MoS served its correction; the backbone has none to serve.
    header, _, backbone_row, mos_row = out.split("\n\n")[-2].splitlines()[-4:]
    column = [cell.strip() for cell in header.split("|")].index("correction served")
    assert [cell.strip() for cell in backbone_row.split("|")][column] == "-"
    assert re.fullmatch(r"[01] of 1", [cell.strip() for cell in mos_row.split("|")][column])


@pytest.mark.parametrize("library, command, code", [("yaml", "train", 2),
                                                     ("matplotlib", "profile", 2), ("matplotlib", "train", 0)])
def test_a_missing_lab_library_is_one_line_naming_the_extra(library, command, code):
    """Training needs no plotting library; anything the command needs and lacks is one line."""
    script = (f"import sys\nsys.modules[{library!r}] = None\nfrom mos.lab.cli import main\n"
              f"sys.exit(main([{command!r}, '--print-config']))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == code, done.stderr
    if code:
        assert done.stderr.strip() == (f"mos {command}: error: the command line needs the lab's libraries "
                                       f"({library} is not installed): pip install 'mixture-of-sequence[lab]'")
