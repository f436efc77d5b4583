"""Import time of kaviz (target: `import kaviz` under 1.5 s), and of its heavier modules.
    python bench/bench_import.py
"""
import statistics
import subprocess
import sys
import time


def cold(stmt: str, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", stmt], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    base = cold("pass")
    for stmt in ("import kaviz", "import kaviz.train", "import kaviz.embed", "import kaviz.widgets"):
        t = cold(stmt)
        print(f"{stmt:24s} {t:6.2f} s (interpreter start {base:.2f} "
              f"s){'  target < 1.5 s' if stmt == 'import kaviz' else ''}")


if __name__ == "__main__":
    main()
