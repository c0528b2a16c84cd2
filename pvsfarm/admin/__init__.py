"""The service layer behind the admin CLI: plain functions over a Session.

Each function validates everything before it writes, raises a domain error
(`NotFound`, `Conflict`, `InvalidInput`...) with one readable line, records
an audit entry for every change, and returns plain dicts for printing.
"""
