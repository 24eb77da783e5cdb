"""The parts of ``scripts/bench`` (the entry point and its ``--help`` are there).

``cli`` parses the options and runs the rounds; ``subjects`` says who is measured (the two
Redis transports, raw redis-py, Kombu alone on ``memory://``, RabbitMQ); ``workloads`` the
Kombu workloads, ``raw`` the redis-py ceilings, ``celerywork`` and ``celeryapp`` the Celery
runs; ``servers`` the private redis-server and the delay proxy, ``rabbit`` the private
RabbitMQ node; ``report`` the arithmetic and the tables (pure: unit tested), ``charts`` the
PNGs; ``nohiredis`` keeps hiredis out of the bench and every process it starts;
``workers`` (``python -m benchlib.workers``) compares Celery workers of several checkouts.
"""
