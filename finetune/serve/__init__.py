"""`qwen-ft serve`: an OpenAI-compatible HTTP server over the decode engine, with a chat page.

    app.py         the FastAPI app: routes, OpenAI error objects, API key
    protocol.py    request fields and their checks
    textstream.py  token ids -> text deltas (UTF-8 safe, stop strings, chat()'s strip)
    worker.py      the engine's decode thread and each request's asyncio queue
    models.py      the base model and its adapters, loaded into one PeftModel
    cli.py         the command line
    background.py  the app under uvicorn (stopping ends requests in flight); in a thread on a free port for tests
    static/        the chat page served at /
"""
