"""TLS for the agent's API: certificate and key files, SSL contexts, and issuing a small site
PKI for test and small deployments.

The mutual-TLS gate that checks a client certificate's subject per request is API middleware
(`agent.api.middleware`); this package only knows files, contexts and certificates.
"""
