"""The studio's model list offers Gemma 3 270M when its package is installed (install.sh installs it), as the alias the
engine loads."""
from slimgpt_core.models import ALIASES, gemma3_installed


def test_the_model_page_lists_gemma3_270m(app):
    assert gemma3_installed()
    options = app.radio(key="model_source").options
    assert "Gemma 3 270M (offline GGUF, Gemma terms)" in options
    assert options.index("Gemma 3 270M (offline GGUF, Gemma terms)") < options.index("Hugging Face hub id")
    assert "gemma3-270m" in ALIASES
