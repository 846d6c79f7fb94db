"""The numbered notebooks' stages over results/<run>/, their report and plots, and the papermill runner."""
