"""Ray Serve application for SDSAT (thin glue over sdsat/; see deployments/sdsat.py)."""
