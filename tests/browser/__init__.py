"""The Playwright browser test (make browser)."""
