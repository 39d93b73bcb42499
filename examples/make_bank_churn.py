"""Write examples/bank_churn.csv: 5,000 synthetic bank-churn predictions (deterministic).

python examples/make_bank_churn.py
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import random
from pathlib import Path

COLUMNS = [
    "event_id", "timestamp", "customer_id", "creditscore", "geography", "gender", "age",
    "tenure", "balance", "numofproducts", "hascrcard", "isactivemember", "estimatedsalary",
    "predicted_churn", "churn",
]  # fmt: skip


def rows(count: int, seed: int = 7) -> list[dict[str, object]]:
    rng = random.Random(seed)
    start = dt.datetime(2024, 1, 1)
    out = []
    for i in range(count):
        age = rng.randint(18, 80)
        balance = round(max(0.0, rng.gauss(76_000, 62_000)), 2)
        products = rng.choice([1, 1, 1, 2, 2, 3, 4])
        active = rng.random() < 0.5
        score = -2.0 + 0.045 * (age - 40) + (0.8 if not active else -0.3) + 0.6 * (products >= 3)
        churn_probability = 1 / (1 + math.exp(-score))
        out.append(
            {
                "event_id": f"evt-{i:06d}",
                "timestamp": (start + dt.timedelta(minutes=7 * i)).strftime("%Y-%m-%d %H:%M:%S"),
                "customer_id": f"cust-{rng.randint(10_000_000, 99_999_999)}",
                "creditscore": rng.randint(350, 850),
                "geography": rng.choice(["France", "Germany", "Spain"]),
                "gender": rng.choice(["Female", "Male"]),
                "age": age,
                "tenure": rng.randint(0, 10),
                "balance": balance,
                "numofproducts": products,
                "hascrcard": rng.choice(["yes", "no"]),
                "isactivemember": "yes" if active else "no",
                "estimatedsalary": round(rng.uniform(11_000, 199_000), 2),
                "predicted_churn": round(churn_probability, 4),
                "churn": "yes" if rng.random() < churn_probability else "no",
            }
        )
    return out


def main() -> None:
    target = Path(__file__).with_name("bank_churn.csv")
    with target.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows(5_000))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
