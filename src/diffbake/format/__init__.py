"""What an artifact is: layout names, the manifest's schema, the components table, atomic writes, integrity and
stamps, host facts and CPU targets, package inspection. Imports nothing of diffbake but its errors; no torch at
import."""
