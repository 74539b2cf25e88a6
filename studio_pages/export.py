"""Download a run as a zip, or get its folder and a load snippet; the model card. Everything shown names the run
it was exported from, and the folder follows the chosen run."""
import streamlit as st

from slimgpt_core.base.errors import SlimGPTError
from slimgpt_core.evaluation.llamacpp import install_llama_cpp, llama_cpp_available
from slimgpt_core.workspace.exports import EXPORTS, default_export_folder
from slimgpt_core.workspace.gguf import DIRECT_TYPES, WEIGHT_TYPES, default_gguf_path, export_run_gguf
from slimgpt_core.services.export import export_run
from slimgpt_core.workspace.store import runs_root
from ui.state import current_run, finished_job, job, live_fragment, require_runs, submit

MAX_DOWNLOAD = 2 * 2**30  # Streamlit holds a download in memory: larger zips stay on disk
DTYPES = ["as stored", "float16", "bfloat16", "float32"]

st.title("Export")
all_runs = require_runs()
labels = {name: info.title for name, info in all_runs.items()}
made = current_run()
rid = st.selectbox("Run", list(labels), format_func=labels.get,
                   index=list(labels).index(made.name) if made and made.name in labels else 0, key="export_run")
run = all_runs[rid]

# The folder widget holds one run's folder at a time: when the chosen run changes, it shows that run's default,
# or the folder the user typed earlier for that run. A folder typed for one run never carries over to another.
ss = st.session_state
typed = ss.setdefault("export_typed_folders", {})  # run name -> folder typed for it
shown_for = ss.get("export_folder_run")
if shown_for != rid or "export_folder" not in ss:
    if shown_for in all_runs and ss.get("export_folder") not in (None, str(default_export_folder(shown_for))):
        typed[shown_for] = ss["export_folder"]  # typed in the same rerun that switched runs
    ss["export_folder"] = typed.get(rid, str(default_export_folder(rid)))
    ss["export_folder_run"] = rid

fmt = st.radio("Format", ["safetensors (transformers)", "GGUF (llama.cpp, Ollama, LM Studio)"], horizontal=True,
               key="export_format")
if fmt.startswith("GGUF"):
    g1, g2 = st.columns([1, 3])
    weight_type = g1.selectbox("Weight type", WEIGHT_TYPES, index=WEIGHT_TYPES.index("q8_0"), key="export_weight_type",
                               help="f32/f16/bf16/q8_0 are written directly; the others by llama.cpp's quantize "
                                    "(needs llama.cpp, built once). Rows whose length is not a multiple of the "
                                    "block (32, or 256 for K-quants) stay in a wider type")
    target = default_gguf_path(rid, weight_type)
    g2.text_input("File", str(target), disabled=True, key=f"export_gguf_file_{rid}_{weight_type}")
    g2.caption(f"Exports **{run.title}** as one GGUF file in the workspace's exports.")
    needs_build = weight_type not in DIRECT_TYPES and not llama_cpp_available()
    busy = bool(job("export_gguf") and job("export_gguf").running) or bool(job("llamacpp") and job("llamacpp").running)
    if needs_build:
        st.info(f"{weight_type} is made by llama.cpp's own quantize routine: build llama.cpp once (about ten minutes "
                "on two cores).")
        if st.button("Build llama.cpp", disabled=busy):
            submit("llamacpp", install_llama_cpp, job_label="llama.cpp", heavy=True)
    elif st.button("Export GGUF", type="primary", disabled=busy):
        submit("export_gguf", export_run_gguf, run.path, target, weight_type, job_label=rid, heavy=True)

    def show_gguf() -> None:
        built = finished_job("llamacpp", "Cancel build")
        if built is not None:
            st.success(f"llama.cpp built (llama-cpp-python {built.result}).")
        latest = job("export_gguf")
        if latest is not None and latest.label != rid:
            st.caption(f"The latest GGUF export is of **{labels.get(latest.label, latest.label)}**.")
            return
        done = finished_job("export_gguf", "Cancel export")
        if done is None:
            return
        result = done.result
        note = (f"; {len(result.fallback_tensors)} tensors kept in f16 (rows not a multiple of the block)"
                if result.fallback_tensors else "")
        st.success(f"Wrote `{result.path}` ({result.bytes / 2**20:.1f} MB, `{result.architecture}` layout, "
                   f"{result.weight_type}, tokenizer from {result.tokenizer_source}{note}).")
        st.markdown(result.instructions)

    live_fragment(show_gguf, "export_gguf", "llamacpp")
    st.stop()

c1, c2 = st.columns([1, 3])
dtype = c1.selectbox("Weights dtype", DTYPES, key="export_dtype",
                     help="as stored: the run's weight files are copied as they are; another dtype loads and "
                          "re-saves the weights")
folder = c2.text_input("Folder", key="export_folder",
                       help="the export folder for this run; FOLDER.zip is written beside it")
if folder != str(default_export_folder(rid)):
    typed[rid] = folder
else:
    typed.pop(rid, None)
c2.caption(f"Exports **{run.title}**. By default into `{runs_root() / EXPORTS}` in the workspace (kept with the "
           "runs; `cache/` is safe to delete, so nothing is exported there).")

running = job("export") is not None and job("export").running
if st.button("Export", type="primary", disabled=running or not folder.strip()):
    submit("export", export_run, run.path, folder, True, dtype, job_label=rid, heavy=False)


def zip_bytes(result) -> bytes:
    """The zip at click time, only if it is still the one this export wrote."""
    if not result.zip_is_current():
        raise SlimGPTError(f"{result.zip_path} changed since {result.title} was exported: export again")
    return result.zip_path.read_bytes()


def show_export() -> None:
    latest = job("export")
    if latest is not None and latest.label != rid:  # another run's export: never shown as this run's
        state = "running" if latest.running else latest.state
        st.caption(f"The latest export is of **{labels.get(latest.label, latest.label)}** ({state}); choose that "
                   "run to see it. Nothing of this run was exported since.")
        return
    ej = finished_job("export", "Cancel export")
    if ej is None:
        return
    result = ej.result
    if result.source_folder is None or result.source_folder.resolve() != run.path.resolve():
        st.caption("The latest export came from another folder than this run.")
        return
    kind = "weights copied as stored" if result.reused_weights else "weights re-saved"
    st.success(f"Exported **{result.title}** to `{result.folder}` ({kind}: {', '.join(result.files)})")
    if result.zip_path is not None and result.zip_is_current():
        size = result.zip_stamp[0]
        if size <= MAX_DOWNLOAD:
            st.download_button(f"Download {result.zip_path.name} ({size / 2**20:.1f} MB)",
                               data=lambda r=result: zip_bytes(r), file_name=result.zip_path.name,
                               mime="application/zip", type="primary", key="download_zip", on_click="ignore")
        else:
            st.info(f"`{result.zip_path}` ({size / 2**30:.1f} GB) is too large to hand to the browser: use it or "
                    "the folder directly.")
    elif result.zip_path is not None:
        st.warning(f"`{result.zip_path}` was replaced or removed since {result.title} was exported: export again.")
    remote = ", trust_remote_code=True" if result.heterogeneous else ""
    st.code("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"model = AutoModelForCausalLM.from_pretrained({str(result.folder)!r}{remote})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({str(result.folder)!r})", language="python")
    with st.expander(f"Model card of {result.title}", expanded=True):
        st.markdown(result.card.split("---", 2)[-1])


live_fragment(show_export, "export")
