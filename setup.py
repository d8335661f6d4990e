# nbdev 2 style setup.py: everything comes from settings.ini
from configparser import ConfigParser
import setuptools

cfg = ConfigParser(delimiters=["="])
cfg.read("settings.ini", encoding="utf-8")
cfg = cfg["DEFAULT"]
reqs = cfg.get("requirements", "").split()
engines = {k: cfg.get(f"{k}_requirements", "").split() for k in ("ray", "slurm")}   # optional executors
dev_reqs = cfg.get("dev_requirements", "").split() + engines["ray"] + engines["slurm"]   # the tests use both

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    author=cfg["author"],
    license="Apache-2.0",
    keywords=cfg.get("keywords", "").split(),
    packages=setuptools.find_packages(include=["alignlora", "alignlora.*"]),
    include_package_data=True,
    package_data={"alignlora": ["tasks/**/*", "configs/*.json"]},
    install_requires=reqs,
    extras_require={"dev": dev_reqs, **engines},
    python_requires=">=" + cfg["min_python"],
    zip_safe=False,
    entry_points={"nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
)
