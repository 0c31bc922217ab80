source bench/device-setup.sh
mkdir -p /root/res /root/kfb; cp docs/bench-results/peers/ceilings.json /root/kfb/
( timeout 540 python3 -m pytest -q -p no:cacheprovider tests/gpu > /root/res/gputests.log 2>&1
  RES=/root/res bash bench/peers.sh ourslcc > /root/res/bench.log 2>&1
  echo done > /root/res/DONE )
