"""Choose and load a model; show its architecture."""
import streamlit as st

from slimgpt_core.base import assets
from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.models import ALIASES, gemma3_installed
from slimgpt_core.services.model_info import describe_model
from ui.state import current_model, load_dense_model

st.title("Model")
OPTIONS = {"Offline default: SmolLM2-135M-Instruct (GGUF)": "default",
           "stories260k (tiny, offline)": "stories260k",
           **({"Gemma 3 270M (offline GGUF, Gemma terms)": "gemma3-270m"} if gemma3_installed() else {}),
           "Hugging Face hub id": "hub",
           "Local folder or .gguf file": "local"}
choice = st.radio("Model", list(OPTIONS), key="model_source")
kind = OPTIONS[choice]
name = kind
if kind == "hub":
    name = st.text_input("Hub id", placeholder="HuggingFaceTB/SmolLM2-135M", key="hub_id").strip()
elif kind == "local":
    name = st.text_input("Path", placeholder="/models/my-llama or model.gguf", key="local_path").strip()
c1, c2 = st.columns(2)
device = c1.selectbox("Device", ["auto", "cpu", "cuda"], key="device",
                      help="auto: CUDA when available. Pruning moves one layer at a time to this device.")
dtype = c2.selectbox("Weights dtype", ["auto", "float32", "float16", "bfloat16"], key="dtype",
                     help="auto: float32 on CPU, float16 on CUDA. Statistics are always float32.")
if assets.asset_root() is None:
    st.warning(f"Offline asset folder not found: set {assets.ENV_VAR} to use the offline models and data.")

if st.button("Load model", type="primary", disabled=not name):
    with st.spinner(f"Loading {name} (a GGUF file is converted once, then cached)…"):
        try:
            load_dense_model(name, device, dtype)
        except SlimGPTError as exc:
            st.error(str(exc))
        else:
            st.rerun()  # the sidebar was drawn before the load

loaded = current_model()
if loaded is not None:
    info = describe_model(loaded)
    st.subheader(f"Loaded: {ALIASES.get(info.name, info.name)}")
    cols = st.columns(6)
    for col, (label, value) in zip(cols, [("layers", info.layers), ("heads", info.heads),
                                          ("KV heads", info.kv_heads), ("FFN width", info.ffn),
                                          ("hidden", info.hidden), ("parameters", f"{info.parameters / 1e6:.2f} M")]):
        col.metric(label, value)
    st.caption(f"{info.architecture} · head dim {info.head_dim} · vocab {info.vocab} · context {info.context} · "
               f"{info.dtype} · decoder layers hold {info.layer_parameters / 1e6:.2f} M parameters · {info.path}")
    if info.kv_heads < info.heads:
        st.info(f"Grouped-query attention: heads are pruned in whole KV groups of {info.heads // info.kv_heads}.")
    st.markdown("**Next step**")
    n1, n2, n3 = st.columns(3)
    n1.page_link("studio_pages/prune.py", label="Prune it: heads and FFN channels, layer by layer",
                 icon=":material/content_cut:")
    n2.page_link("studio_pages/shear.py", label="Shear it to a target shape", icon=":material/compress:")
    n3.page_link("studio_pages/evaluate.py", label="Evaluate the dense model first", icon=":material/leaderboard:")
