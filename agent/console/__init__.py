"""The site admin's web console: server-rendered pages on a listener of their own.

What the people who decide whether a hospital joins a consortium want to look at: the datasets
the agent sees, the plans waiting for approval, the rounds that ran and what each sent out, and
whether the audit chain is intact; approving or revoking a plan is its one important action.

- `models`: the admin accounts and their login sessions (tables);
- `auth`: passwords (argon2), sessions, CSRF tokens; `fedsite admin-users` uses it too;
- `views`: what each page shows, gathered from the service without any HTTP;
- `thumbnails`: preview slices of a subject rendered locally as PNG pixels;
- `app`: the FastAPI app (routes, login, CSRF check, security headers);
- `server`: the listener, started by `fedsite serve` beside the API, never on its port.

Nothing the console answers carries a patient name or ID, a DICOM header value or a local path:
subjects are shown by their keyed hash, and thumbnails are pixels only, for a logged-in admin.
"""
