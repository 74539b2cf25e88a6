"""One job and `ui.state.live_fragment` over it: the page tests/studio/browser/test_browser_polling.py drives."""
import time

import streamlit as st

from ui.state import job, live_fragment, submit


def nap(seconds: float, callback=None, should_stop=None) -> float:
    time.sleep(seconds)
    return seconds


if st.button("Start"):
    submit("nap", nap, 2.0, heavy=False)


def view() -> None:
    st.session_state["draws"] = st.session_state.get("draws", 0) + 1
    j = job("nap")
    st.markdown(f"state **{j.state if j else 'none'}** · draws {st.session_state['draws']}")


live_fragment(view, "nap")
