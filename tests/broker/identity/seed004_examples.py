# ruff: noqa
# fmt: off
"""Seed 004's examples (xcore API reference), copied VERBATIM: the request bodies of
`POST /auth/register` and `POST /auth/login`, the response fields it documents, and its
"Exemple Python" client code. `run_python_example(base_url)` runs that code as it is, with only its
base URL (https://api.example.com) pointed at the test server, and returns its globals."""

REGISTER_BODY = {
  "email": "user@example.com",
  "password": "SecurePassword123!",
  "full_name": "John Doe"
}

REGISTER_RESPONSE_201 = {
  "id": 1,
  "email": "user@example.com",
  "full_name": "John Doe",
  "is_active": True,
  "created_at": "2024-01-15T10:30:00Z"
}

LOGIN_BODY = {
  "username": "user@example.com",
  "password": "SecurePassword123!"
}

PYTHON_EXAMPLE = '''
import requests

# Authentification
response = requests.post(
    "https://api.example.com/auth/login",
    data={"username": "admin@example.com", "password": "secret"}
)
token = response.json()["access_token"]

# Requête API
headers = {"Authorization": f"Bearer {token}"}
users = requests.get(
    "https://api.example.com/admin/users",
    headers=headers
).json()
'''


def run_python_example(base_url: str) -> dict:
    namespace: dict = {}
    exec(PYTHON_EXAMPLE.replace("https://api.example.com", base_url.rstrip("/")), namespace)
    return namespace
