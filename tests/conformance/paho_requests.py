"""Eclipse Paho (paho-mqtt 2.x, MQTT 5) as an application asking an agent to classify images.

Usage: python paho_requests.py PORT DEVICE REPLY_TOPIC IMAGE ID_PREFIX
Connects to 127.0.0.1:PORT as an MQTT 5 client (clean start on the first connection only, as
Paho does by default), subscribes to REPLY_TOPIC (QoS 1) and prints {"ready": true}. Each line
`send N` on its standard input publishes N more requests to edge/DEVICE/classify (QoS 1, the
raw IMAGE as payload, Response Topic REPLY_TOPIC, Correlation Data "ID_PREFIX-<n>", n counting
from 0). It prints one JSON line per reply received: {"correlation": ..., "id": ..., "error":
...}. When its standard input closes it prints {"done": true, "replies": N} and exits.
"""

import json
import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

port, device, reply_topic, image_path, prefix = sys.argv[1:]
image = open(image_path, "rb").read()
out = threading.Lock()
subscribed = threading.Event()
replies = 0


def on_connect(client, userdata, flags, reason_code, properties):
    client.subscribe(reply_topic, qos=1)


def on_subscribe(client, userdata, mid, reason_codes, properties):
    subscribed.set()


def on_message(client, userdata, message):
    global replies
    props = message.properties
    correlation = getattr(props, "CorrelationData", b"") or b""
    try:
        doc = json.loads(message.payload)
    except ValueError:
        doc = {"unparsed": message.payload.decode("utf-8", "replace")}
    line = {
        "correlation": correlation.decode("utf-8", "replace"),
        "id": doc.get("id"),
        "error": doc.get("error"),
    }
    with out:
        replies += 1
        print(json.dumps(line), flush=True)


client = mqtt.Client(
    callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
    client_id=f"paho-{prefix}",
    protocol=mqtt.MQTTv5,
)
client.on_connect = on_connect
client.on_subscribe = on_subscribe
client.on_message = on_message
client.connect("127.0.0.1", int(port), keepalive=30)
client.loop_start()
if not subscribed.wait(10):
    sys.exit("paho_requests.py: no SUBACK within 10 s")
with out:
    print(json.dumps({"ready": True}), flush=True)
sent = 0
for command in sys.stdin:
    words = command.split()
    if words[:1] != ["send"] or len(words) != 2:
        sys.exit(f"paho_requests.py: unknown command {command!r} (send N)")
    for _ in range(int(words[1])):
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = f"{prefix}-{sent}".encode()
        client.publish(f"edge/{device}/classify", image, qos=1, properties=props)
        sent += 1
client.disconnect()
client.loop_stop()
with out:
    print(json.dumps({"done": True, "replies": replies}), flush=True)
