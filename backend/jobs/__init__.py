"""Training jobs: the queue in the database (queue.py) and the trainer registry (kinds.py).

The web server only queues, reads and cancels jobs; `python -m backend.worker` runs them
(app.py starts one unless --no-worker). See backend/worker.py.
"""
