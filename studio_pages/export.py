"""Download a run as a zip, or get its folder and a load snippet; the model card."""
from pathlib import Path

import streamlit as st

from slimgpt_core.assets import cache_root
from slimgpt_core.studio import export_run
from ui.state import current_run, finished_job, job, live_fragment, require_runs, submit

st.title("Export")
all_runs = require_runs()
labels = {name: info.title for name, info in all_runs.items()}
made = current_run()
rid = st.selectbox("Run", list(labels), format_func=labels.get,
                   index=list(labels).index(made.name) if made and made.name in labels else 0, key="export_run")
run = all_runs[rid]
c1, c2 = st.columns([1, 3])
dtype = c1.selectbox("Weights dtype", ["as loaded", "float16", "bfloat16", "float32"], key="export_dtype")
folder = c2.text_input("Folder", str(cache_root() / "exports" / rid), key="export_folder")
MAX_DOWNLOAD = 2 * 2**30  # larger zips are not held in memory for the browser

if st.button("Export", type="primary", disabled=bool(job("export") and job("export").running)):
    submit("export", export_run, run.path, folder, True, dtype, job_label=rid, heavy=False)


def show_export() -> None:
    ej = finished_job("export", "Cancel export")
    if ej is None or ej.label != rid:
        return
    result = ej.result
    size = result.zip_path.stat().st_size if result.zip_path and result.zip_path.exists() else None
    st.success(f"Written to `{result.folder}` ({', '.join(result.files)})")
    if size is not None and size <= MAX_DOWNLOAD:
        st.download_button(f"Download {result.zip_path.name} ({size / 2**20:.1f} MB)",
                           data=lambda p=result.zip_path: Path(p).read_bytes(), file_name=result.zip_path.name,
                           mime="application/zip", type="primary", key="download_zip", on_click="ignore")
    else:
        st.info("Too large to hand to the browser: use the folder directly.")
    remote = ", trust_remote_code=True" if result.heterogeneous else ""
    st.code("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"model = AutoModelForCausalLM.from_pretrained({str(result.folder)!r}{remote})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({str(result.folder)!r})", language="python")
    card = Path(result.folder) / "README.md"
    if card.exists():
        with st.expander("Model card", expanded=True):
            st.markdown(card.read_text().split("---", 2)[-1])


live_fragment(show_export, "export")
