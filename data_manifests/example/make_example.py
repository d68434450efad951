"""Write the example manifest and its tiny synthetic CXR-like images.

Run once from anywhere: ``python data_manifests/example/make_example.py``.
The images are 64x64 grayscale PNGs drawn from a fixed formula (no
randomness, no real patient data), so rerunning rewrites identical files.
They exist only so that ``covreport validate`` finds every image; they are
not meant to be scored.
"""

import csv
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
SIZE = 64

# patient, age, sex, image dates (one image per visit)
PATIENTS = [
    ("P01", 54, "M", ["2020-03-02", "2020-03-05", "2020-03-09"]),
    ("P02", 67, "F", ["2020-03-10", "2020-03-12", "2020-03-17"]),
    ("P03", 41, "Male", ["2020-03-20", "2020-03-21", "2020-03-26"]),
]
OUTCOMES = ["Worse", "Improved", "Worse", "Stable", "W", "i"]  # short codes are accepted too


def cxr(opacity, width):
    """A chest-X-ray-like picture: dark lungs in a bright body, plus a hazy patch."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    body = 0.75 - 0.35 * ((x - 0.5) ** 2 + (y - 0.55) ** 2)
    lungs = np.exp(-(((x - 0.3) / width) ** 2 + ((y - 0.5) / 0.28) ** 2)) + \
        np.exp(-(((x - 0.7) / width) ** 2 + ((y - 0.5) / 0.28) ** 2))
    haze = opacity * np.exp(-(((x - 0.3) / 0.12) ** 2 + ((y - 0.65) / 0.12) ** 2))
    img = np.clip(body - 0.5 * lungs + haze, 0, 1)
    return Image.fromarray((img * 255).round().astype(np.uint8), mode="L")


def main():
    images = HERE / "images"
    images.mkdir(exist_ok=True)
    rows, k = [], 0
    for p, (pid, age, sex, dates) in enumerate(PATIENTS):
        names = []
        for v, _date in enumerate(dates):
            name = f"images/{pid}_{v + 1}.png"
            cxr(0.1 + 0.15 * ((p + v) % 3), 0.12 + 0.02 * p).save(HERE / name, optimize=True)
            names.append(name)
        for v in range(len(dates) - 1):
            k += 1
            rows.append({
                "pair_id": f"pair{k:02d}", "patient_id": pid,
                "first_image": names[v], "second_image": names[v + 1],
                "outcome": OUTCOMES[k - 1],
                "first_date": dates[v], "second_date": dates[v + 1],
                "age": age, "sex": sex, "first_view": "AP", "second_view": "AP",
                "source": "synthetic example", "notes": "",
                "site": "demo",  # an extra column: carried through untouched
            })
    tmp = HERE / "manifest.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(HERE / "manifest.csv")


if __name__ == "__main__":
    main()
