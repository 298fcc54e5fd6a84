# ruff: noqa
# type: ignore
"""The seed 002 client (CyberSensei node integration guide), copied verbatim from
/work/shared/seeds/002_404cd2794cb1d50b.txt (its accents restored from the document's Mac Roman
mis-encoding). It must run UNCHANGED against the broker: do not edit the class."""
# fmt: off

import requests
import json
import time
from datetime import datetime

class CyberSenseiClient:
    def __init__(self, backend_url, license_key):
        self.backend_url = backend_url.rstrip('/')
        self.license_key = license_key
        self.tenant_id = None
        self.current_version = "1.0.0"
    
    def validate_license(self):
        """Valider la licence au démarrage"""
        try:
            response = requests.get(
                f"{self.backend_url}/api/license/validate",
                params={"key": self.license_key},
                timeout=10
            )
            
            if response.status_code == 200:
                data = response.json()
                if data.get("valid"):
                    self.tenant_id = data["tenantId"]
                    print(f"✅ Licence valide pour: {data['tenantName']}")
                    return True
            
            print(f"❌ Licence invalide: {response.json().get('message')}")
            return False
            
        except Exception as e:
            print(f"❌ Erreur de validation: {str(e)}")
            return False
    
    def check_updates(self):
        """Vérifier les mises à jour disponibles"""
        if not self.tenant_id:
            print("❌ Licence non validée")
            return None
        
        try:
            response = requests.get(
                f"{self.backend_url}/update/check",
                params={
                    "tenantId": self.tenant_id,
                    "version": self.current_version
                },
                timeout=10
            )
            
            if response.status_code == 200:
                data = response.json()
                if data.get("updateAvailable"):
                    print(f"🔔 Mise à jour disponible: {data['latestVersion']}")
                    print(f"📝 Changelog:\n{data['changelog']}")
                    return data
                else:
                    print("✅ Version à jour")
                    return None
                    
        except Exception as e:
            print(f"❌ Erreur vérification update: {str(e)}")
            return None
    
    def download_update(self, update_id, output_path):
        """Télécharger une mise à jour"""
        try:
            response = requests.get(
                f"{self.backend_url}/update/download/{update_id}",
                stream=True,
                timeout=300
            )
            
            if response.status_code == 200:
                with open(output_path, 'wb') as f:
                    for chunk in response.iter_content(chunk_size=8192):
                        f.write(chunk)
                print(f"✅ Mise à jour téléchargée: {output_path}")
                return True
            
            return False
            
        except Exception as e:
            print(f"❌ Erreur téléchargement: {str(e)}")
            return False
    
    def send_telemetry(self, metrics):
        """Envoyer de la télémétrie"""
        if not self.tenant_id:
            print("❌ Licence non validée")
            return False
        
        try:
            payload = {
                "tenantId": self.tenant_id,
                "uptime": metrics["uptime"],
                "activeUsers": metrics["active_users"],
                "exercisesCompletedToday": metrics["exercises_completed"],
                "aiLatency": metrics.get("ai_latency"),
                "version": self.current_version,
                "additionalData": metrics.get("additional_data", {})
            }
            
            response = requests.post(
                f"{self.backend_url}/telemetry",
                json=payload,
                timeout=10
            )
            
            if response.status_code == 201:
                print("✅ Télémétrie envoyée")
                return True
            
            print(f"❌ Erreur télémétrie: {response.status_code}")
            return False
            
        except Exception as e:
            print(f"❌ Erreur envoi télémétrie: {str(e)}")
            return False
    
    def start_telemetry_loop(self, interval=300):
        """Boucle d'envoi de télémétrie (toutes les 5 minutes par défaut)"""
        while True:
            metrics = self.collect_metrics()
            self.send_telemetry(metrics)
            time.sleep(interval)
    
    def collect_metrics(self):
        """Collecter les métriques du système (à implémenter)"""
        return {
            "uptime": int(time.time()),  # À remplacer par le vrai uptime
            "active_users": 42,  # À remplacer
            "exercises_completed": 156,  # À remplacer
            "ai_latency": 247.5,  # À remplacer
            "additional_data": {
                "cpu": 45.2,
                "memory": 62.8
            }
        }
