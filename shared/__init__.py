"""fleettune's server-side core: everything more than one process uses, with no Celery in it."""
