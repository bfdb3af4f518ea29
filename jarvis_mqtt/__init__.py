"""JARVIS over MQTT: a transformer LLM split layer by layer across edge devices."""

from jarvis_mqtt.errors import JarvisError

__all__ = ["JarvisError"]
__version__ = "0.1.0"
