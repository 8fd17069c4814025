"""One router per API resource; each reads what it needs from ``request.app.state.vbs``."""
