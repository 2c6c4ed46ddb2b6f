"""Per-dataset settings of the protocol configs: every spelling of a dataset gets its recipe.

The expected values are the specs' (promptsrc.md 5, bayesian.md 4.3, protocol.md 1.2), typed
here independently of configs/common.py.
"""

import pytest

from jaxprompt.app import flags
from jaxprompt.data import catalog

# promptsrc.md 5: few-shot GPA mean / std
SHARP = {"StanfordCars", "OxfordFlowers", "FGVCAircraft", "DescribableTextures", "EuroSAT"}
# bayesian.md 4.3 (VPT.md): (L, epochs)
BAYES = {
    "Caltech101": (20, 20), "OxfordPets": (40, 20), "StanfordCars": (20, 40),
    "OxfordFlowers": (10, 40), "Food101": (20, 20), "FGVCAircraft": (10, 10), "SUN397": (20, 10),
    "DescribableTextures": (40, 10), "EuroSAT": (20, 60), "UCF101": (5, 20), "ImageNet": (10, 10),
}  # fmt: skip
TOY = {"toy_textures", "toy_textures_sketch", "toy_textures_night", "toy_textures_cartoon",
       "toy_colours"}  # fmt: skip


def _spellings(spec) -> set[str]:
    names = {spec.name, *spec.aliases}
    return names | {n.upper() for n in names} | {n.lower().replace("_", "-") for n in names}


def _config(protocol: str, method: str, dataset: str):
    config, _ = flags.parse_run_flags(
        ["jaxprompt", "--config", f"{protocol}:{method},dataset={dataset}", "--workdir", "-"],
        need_config=True,
    )
    return config


SPECS = [s for s in catalog.DATASETS.values() if s.custom is None]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_alias_gets_the_datasets_recipe_in_every_protocol(spec):
    for spelling in sorted(_spellings(spec)):
        assert catalog.canonical_name(spelling) == spec.name
        toy = spec.name in TOY
        for protocol in ("base2new", "fewshot", "xdomain"):
            for method in ("promptsrc", "bayes", "zeroshot"):
                if protocol == "base2new" and spec.test_only:
                    continue
                c = _config(protocol, method, spelling)
                assert (c.clip.name == "toy") == toy, (protocol, spelling)
                kw = c.method.kw
                if method == "zeroshot":
                    assert kw.templates == "dataset"
                if method == "promptsrc" and protocol == "fewshot":
                    want = (45.0, 5.0) if spec.name in SHARP else (30.0, 30.0)
                    assert (kw.gpa_mean, kw.gpa_std) == want, spelling
                if method == "bayes" and protocol in ("base2new", "xdomain"):
                    samples, epochs = BAYES.get(spec.name, (10, 10))
                    assert kw.mc_samples == samples and c.optim.epochs == epochs, spelling
        for preset in ("tpt", "pouf"):
            c = _config("adapt", preset, spelling)
            assert (c.clip.name == "toy") == toy, (preset, spelling)


def test_the_readme_sweep_datasets_get_the_sharp_gpa():
    # The README's sweep names dtd and eurosat: before, only the catalog spelling matched.
    for name in ("dtd", "eurosat", "cars", "flowers", "aircraft"):
        kw = _config("fewshot", "promptsrc", name).method.kw
        assert (kw.gpa_mean, kw.gpa_std) == (45.0, 5.0), name
    kw = _config("fewshot", "promptsrc", "pets").method.kw
    assert (kw.gpa_mean, kw.gpa_std) == (30.0, 30.0)


def test_an_unknown_dataset_is_a_config_error_listing_the_names(tmp_path, capsys):
    from jaxprompt import cli

    workdir = tmp_path / "run"
    args = ["jaxprompt", "train", "--config", "fewshot:coop,dataset=dtdd", "--workdir", workdir]
    assert cli.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown dataset 'dtdd'" in err[0]
    assert "DescribableTextures" in err[0] and not workdir.exists()  # nothing written
    c = _config("fewshot", "coop", "folder:/data/office31/amazon")  # user datasets pass
    assert c.clip.name != "toy"


@pytest.mark.parametrize("preset", ["pouf", "pouf_full"])
def test_pouf_configs_build_for_domainnet_targets(preset):
    # DomainNet domains are POUF's targets but not catalog entries: the config asked the catalog
    # whether the name was a toy dataset and failed with "unknown dataset 'DomainNet/clipart'".
    for name, domain in (("DomainNet/clipart", "clipart"), ("domainnet_q", "quickdraw")):
        c = _config("adapt", preset, name)
        assert c.data.dataset == name and catalog.domainnet_domain(name) == domain
        # Not the toy world: ViT-B/16 and POUF's own crop scale (the toy's is 0.5-1).
        assert c.clip.name == "openai/clip-vit-base-patch16"
        assert tuple(c.data.rrc_scale) == (0.08, 1.0)
        assert c.optim.iters_per_epoch == 500
    # (absl wraps the config's ValueError; the user's one line is in test_user_errors)
    with pytest.raises(Exception, match="unknown DomainNet domain 'nope'; choose one of clipart"):
        _config("adapt", preset, "DomainNet/nope")
    assert catalog.domainnet_domain("toy_textures_sketch") is None
